"""Draft-then-verify drafting k tokens near max_tokens too, for uniform 1+k steps.

On a GPU whose target replays FULL CUDA graphs the proposer pads (``pad_drafts_to_k``);
the CPU engine has no graphs, so the flag is switched on here by hand. Outputs stay
the target's (vLLM drops what is accepted past max_tokens), drafting happens, and
every draft the proposer hands vLLM has k tokens.
"""

from __future__ import annotations

import pytest

from engine_utils import counter, engine, generate_ids, hippo_config, proposer_of
from test_hippo_lossless import baseline, baselines, requests, tokenizer  # noqa: F401 - shared fixtures

pytestmark = pytest.mark.engine

K = 3


def test_padded_drafts_are_lossless_and_all_k_long(tiny, requests, baseline):
    with engine(tiny.target, speculative_config=hippo_config(tiny.draft, K, parallel=False)) as llm:
        proposer, lengths = proposer_of(llm), []
        assert not proposer.pad_drafts_to_k  # no FULL CUDA graphs on the CPU
        proposer.pad_drafts_to_k = True
        propose_batch = proposer.propose_batch

        def recording(*args):
            drafts = propose_batch(*args)
            lengths.extend(len(draft) for draft in drafts if draft)
            return drafts

        proposer.propose_batch = recording
        assert generate_ids(llm, requests, max_tokens=24) == baseline["single"]
        assert counter(llm, "vllm:spec_decode_num_draft_tokens") > 0
    assert lengths and set(lengths) == {K}
