"""What GPU users run that the CPU cannot: `make gpu-check` runs this module under the gpu profile.

- an engine at production sizes (0.9 of the GPU memory, vLLM's default
  ``max_num_seqs``, ``max_model_len`` and batch budget) starts and answers;
- an fp8 KV cache: lossless, drafting, every view built with the target's attention;
- a long video whose prefill is chunked, so the video's keys and the text queries
  after it arrive in different steps: lossless, every view with the target's attention;
- a prefill whose last chunk is 1+K tokens, alone in its step: vLLM replays a FULL
  CUDA graph for such a "uniform decode" batch (``GPUModelRunner._is_uniform_decode``),
  in which the attention capture never runs. The correct outcome is a view built
  without the target's attention, counted, and a lossless output.

Skipped on the cpu profile (no CUDA).
"""

from __future__ import annotations

import pytest

from engine_utils import PROFILE, counter, engine, generate_ids, hippo_config, proposer_of, video_request

pytestmark = [
    pytest.mark.engine,
    pytest.mark.skipif(PROFILE != "gpu", reason="GPU deployment checks: run by make gpu-check"),
]

K = 3
LONG_FRAMES = 32  # 4x the tests' usual frames: 256 video tokens at the tiny fixtures' size
CHUNK = 64


@pytest.fixture(scope="module")
def long_video_request(tiny, tiny_tokenizer):
    return video_request(tiny_tokenizer, "Describe this video.", tiny.synthetic_videos[0], num_frames=LONG_FRAMES)


def test_a_production_size_engine_starts_and_answers(tiny, tiny_tokenizer):
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(tiny.target), dtype="bfloat16", gpu_memory_utilization=0.9, seed=0,
              limit_mm_per_prompt={"image": 0, "video": 1},
              speculative_config=hippo_config(tiny.draft, K))
    try:
        request = video_request(tiny_tokenizer, "Describe this video.", tiny.synthetic_videos[0])
        (out,) = llm.generate([request], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
        assert len(out.outputs[0].token_ids) == 24
        assert counter(llm, "vllm:spec_decode_num_draft_tokens") > 0
    finally:
        llm.llm_engine.engine_core.shutdown()


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_a_long_chunked_video_keeps_the_targets_attention(kv_cache_dtype, tiny, long_video_request):
    overrides = {"kv_cache_dtype": kv_cache_dtype, "max_num_batched_tokens": CHUNK, "enable_chunked_prefill": True}
    with engine(tiny.target, **overrides) as llm:
        expected = generate_ids(llm, [long_video_request], max_tokens=24)
        prompt_tokens = len(llm.generate([long_video_request], use_tqdm=False)[0].prompt_token_ids)
    # No chunk of 1+K tokens (a FULL-graph replay, tested below); several chunks.
    assert prompt_tokens > 2 * CHUNK and prompt_tokens % CHUNK not in (0, 1 + K)
    with engine(tiny.target, speculative_config=hippo_config(tiny.draft, K), **overrides) as llm:
        assert generate_ids(llm, [long_video_request], max_tokens=24) == expected
        assert counter(llm, "vllm:spec_decode_num_draft_tokens") > 0
        stats = proposer_of(llm).stats
        assert stats.draft_views == 1 and stats.views_without_target_attention == 0


def test_a_last_chunk_replayed_as_a_full_graph_gives_a_view_without_attention(tiny, long_video_request):
    with engine(tiny.target) as llm:
        expected = generate_ids(llm, [long_video_request], max_tokens=24)
        prompt_tokens = len(llm.generate([long_video_request], use_tqdm=False)[0].prompt_token_ids)
    # A budget that leaves a last chunk of exactly 1+K tokens, alone in its step.
    budget = next(b for b in range(CHUNK, prompt_tokens) if prompt_tokens % b == 1 + K)
    overrides = {"max_num_batched_tokens": budget, "enable_chunked_prefill": True}
    with engine(tiny.target, speculative_config=hippo_config(tiny.draft, K), **overrides) as llm:
        assert generate_ids(llm, [long_video_request], max_tokens=24) == expected
        assert counter(llm, "vllm:spec_decode_num_draft_tokens") > 0
        stats = proposer_of(llm).stats
        assert stats.draft_views == 1 and stats.views_without_target_attention == 1
