"""The draft's KV cache is sized by draft_kv_tokens, inside vLLM's KV memory.

Unit tests of the sizing rule, then the real engine on the tiny fixtures: a
large max_num_seqs and long context start with a small draft cache, target plus
draft stay within kv_cache_memory_bytes, and a draft cache too small for the
batch pauses drafting (counted) without changing any output.
"""

from __future__ import annotations

import time

import pytest

from engine_utils import (
    ENGINE_DEFAULTS,
    counter,
    draft_worker_of,
    engine,
    generate_ids,
    hippo_config,
    proposer_of,
    text_request,
    video_request,
)
from hippo_vllm.vllm.target.draft_kv_budget import DraftKVBudget

BLOCK = 32
MIB = 1 << 20


def budget(setting="auto", keep_ratio=0.1, max_useful_tokens=10**9, draft_bytes_per_token=512):
    return DraftKVBudget(setting, keep_ratio, max_useful_tokens, draft_bytes_per_token, BLOCK)


def test_auto_gives_the_draft_a_quarter_of_the_targets_tokens_within_the_budget():
    available, target_per_token = 64 * MIB, 1536
    reserved = budget().reserve_bytes(available, target_per_token)
    # T * 1536 + 0.25 * T * 512 = 64 MiB  ->  T = 40329.8 tokens, draft 10082 -> 315 blocks.
    assert reserved == 315 * BLOCK * 512
    target_tokens = (available - reserved) // target_per_token
    assert budget().num_blocks(target_tokens) * BLOCK * 512 <= reserved
    assert target_tokens * target_per_token + reserved <= available


def test_auto_follows_keep_ratio_above_a_quarter_and_is_capped_by_what_requests_can_use():
    half = budget(keep_ratio=0.5).num_blocks(target_tokens=64_000)
    assert half == 32_000 // BLOCK
    assert budget(keep_ratio=0.5, max_useful_tokens=4 * 1029).num_blocks(64_000) == 4 * 1029 // BLOCK
    capped = budget(max_useful_tokens=1000).reserve_bytes(64 * MIB, 1536)
    assert capped == (1000 // BLOCK) * BLOCK * 512


def test_an_explicit_token_count_is_whole_blocks_and_must_fit():
    assert budget(100).num_blocks(target_tokens=10**6) == 3
    assert budget(100).reserve_bytes(MIB, 1536) == 3 * BLOCK * 512
    assert budget(1).num_blocks(target_tokens=0) == 1  # at least one block
    with pytest.raises(ValueError, match=r'\["draft_kv_tokens"\]=4096 needs 0.002 GiB .* only 0.001 GiB'):
        budget(4096).reserve_bytes(MIB, 1536)


def test_the_drafts_measured_working_memory_comes_off_first_and_is_part_of_the_reservation():
    available, target_per_token, headroom = 64 * MIB, 1536, 8 * MIB
    reserved = budget().reserve_bytes(available, target_per_token, headroom)
    # T * 1536 + 0.25 * T * 512 = 56 MiB  ->  T = 35288.6 tokens, draft 8822 -> 275 blocks.
    assert reserved == 275 * BLOCK * 512 + headroom
    target_tokens = (available - reserved) // target_per_token
    assert target_tokens * target_per_token + reserved <= available
    with pytest.raises(ValueError, match=r"working memory \(0.062 GiB.* leaves nothing of the 0.062 GiB"):
        budget().reserve_bytes(available, target_per_token, available)


# -- real engine (in-process, tiny fixtures) ----------------------------------------------

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}[ENGINE_DEFAULTS["dtype"]]
DRAFT_BYTES_PER_TOKEN = 1 * 2 * 2 * 32 * DTYPE_BYTES  # tiny draft: layers x (K, V) x kv heads x head_dim x dtype
TARGET_BYTES_PER_TOKEN = 3 * 2 * 2 * 32 * DTYPE_BYTES


def storage_bytes(tensors) -> int:
    """Bytes of the distinct buffers behind ``tensors`` (KV caches are views of one buffer)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


@pytest.mark.engine
def test_many_sequences_and_a_long_context_start_with_a_small_draft_cache_inside_the_kv_budget(tiny):
    kv_budget, max_num_seqs, max_model_len = 64 * MIB, 256, 4096  # the fixture's longest context
    with engine(tiny.target, speculative_config=hippo_config(tiny.draft), max_num_seqs=max_num_seqs,
                max_model_len=max_model_len, kv_cache_memory_bytes=kv_budget) as llm:
        draft = draft_worker_of(llm)
        runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
        target_bytes = storage_bytes(runner.kv_caches)
        draft_bytes = storage_bytes(draft.engine.kv.kv_caches.values())
        draft_tokens = draft.engine.kv.num_blocks * BLOCK
        target_block = runner.cache_config.block_size
        target_tokens = llm.llm_engine.vllm_config.cache_config.num_gpu_blocks * target_block
    # Sized for every sequence at full length it would be 256 x 4100 tokens (537 MB in float32).
    assert draft_bytes == draft_tokens * DRAFT_BYTES_PER_TOKEN == draft.engine.kv.num_bytes
    assert draft_tokens == (target_tokens // 4) // BLOCK * BLOCK  # "auto": a quarter (keep_ratio 0.1)
    assert target_bytes == target_tokens * TARGET_BYTES_PER_TOKEN
    assert target_bytes + draft_bytes <= kv_budget
    # Only block rounding is left unused.
    assert target_bytes + draft_bytes > kv_budget - TARGET_BYTES_PER_TOKEN * target_block - DRAFT_BYTES_PER_TOKEN * BLOCK


def exported_counter(llm, name: str, expected: float, timeout: float = 5.0) -> float:
    """``name`` from get_metrics(), polled until it shows ``expected`` or ``timeout`` s pass."""
    deadline = time.monotonic() + timeout
    while (value := counter(llm, name)) != expected and time.monotonic() < deadline:
        time.sleep(0.1)
    return value


@pytest.fixture(scope="module")
def five_requests(tiny, tiny_tokenizer):
    """Three video and two text requests, and the target's own greedy outputs."""
    videos = tiny.synthetic_videos
    requests = [video_request(tiny_tokenizer, f"Describe video {i}.", videos[i % len(videos)]) for i in range(3)]
    requests += [text_request(tiny_tokenizer, q) for q in ("What is a video?", "Count to ten.")]
    with engine(tiny.target) as llm:
        return requests, generate_ids(llm, requests, max_tokens=24)


@pytest.mark.engine
@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "vpsd"])
def test_a_full_draft_cache_pauses_drafting_and_outputs_stay_the_targets(parallel, tiny, five_requests):
    requests, expected = five_requests
    # Three blocks: one or two compact prompts at a time, not five.
    config = hippo_config(tiny.draft, parallel=parallel, draft_kv_tokens=3 * BLOCK)
    with engine(tiny.target, speculative_config=config) as llm:
        assert generate_ids(llm, requests, max_tokens=24) == expected
        assert draft_worker_of(llm).engine.kv.num_blocks == 3
        paused = proposer_of(llm).stats.draft_kv_full
        # The worker's figures reach get_metrics() (and /metrics) with its next snapshot.
        assert exported_counter(llm, "vllm:hippo_draft_kv_full", paused) == paused
        drafted = counter(llm, "vllm:spec_decode_num_draft_tokens")
    assert paused > 0 and drafted > 0
