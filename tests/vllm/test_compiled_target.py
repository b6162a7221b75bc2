"""A compiled target (enforce_eager=False) serves hippo losslessly; the draft runs eagerly.

The draft never inherits the target's torch.compile: a compiled draft would
compile during serving and would refuse forwards longer than
max_num_batched_tokens. The compact prompt here is longer than that (keep_ratio
1.0, a small max_num_batched_tokens), so it is prefilled in pieces. One lean
test: a compiled engine takes about a minute to start on CPU.
"""

from __future__ import annotations

import pytest

from engine_utils import counter, draft_worker_of, engine, generate_ids, hippo_config, recording_views, video_request

pytestmark = pytest.mark.engine

BATCH_TOKENS = 64  # the video prompt is ~90 tokens; its compact form keeps them all
COMPILED = {"enforce_eager": False, "max_num_batched_tokens": BATCH_TOKENS, "enable_chunked_prefill": True,
            "max_num_seqs": 2}


def test_long_compact_prefill_behind_a_compiled_target_drafts_and_is_lossless(tiny, tiny_tokenizer):
    from vllm.config import CompilationMode, CUDAGraphMode

    # On CPU vLLM compiles the target with DYNAMO_TRACE_ONCE, on a GPU with VLLM_COMPILE.

    request = [video_request(tiny_tokenizer, "Describe this video.", tiny.synthetic_videos[0])]
    with engine(tiny.target, **COMPILED) as llm:
        expected = generate_ids(llm, request, max_tokens=24)
        assert llm.llm_engine.vllm_config.compilation_config.mode != CompilationMode.NONE
    config = hippo_config(tiny.draft, keep_ratio=1.0)
    with engine(tiny.target, speculative_config=config, **COMPILED) as llm:
        views = recording_views(llm)
        draft = draft_worker_of(llm).engine
        rows, run = [], draft.run
        draft.run = lambda inputs: (rows.append(sum(i.num_rows for i in inputs)), run(inputs))[1]
        assert generate_ids(llm, request, max_tokens=24) == expected
        draft_compilation = draft.draft_vllm_config.compilation_config
        drafted = counter(llm, "vllm:spec_decode_num_draft_tokens")
    assert [view.compact_len > BATCH_TOKENS for view in views] == [True]
    assert drafted > 0  # for the one request
    assert max(rows) == BATCH_TOKENS  # its compact prompt was prefilled in pieces
    assert (draft_compilation.mode, draft_compilation.cudagraph_mode) == (CompilationMode.NONE, CUDAGraphMode.NONE)
