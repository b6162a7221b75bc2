"""Serving with "method": "hippo" is lossless against the same engine without speculation.

Every engine here is the real vLLM engine in-process on the tiny offline
checkpoints (greedy unless stated), with the test profile's settings
(tests/engine_utils.py: float32 and eager on the CPU profile). The main text/video/
batch test also runs in bfloat16, eagerly and compiled. The baseline outputs come
from the target alone with the same settings. Every test also checks that drafting
happened: the proposer recovers from drafting errors by proposing nothing, which
would leave the outputs lossless but untested.
"""

from __future__ import annotations

import random

import pytest

from engine_utils import (
    ENGINE_DEFAULTS,
    PROFILE,
    counter,
    draft_worker_of,
    engine,
    generate_ids,
    greedy,
    proposer_of,
    recording_views,
    schedule_matrix,
    text_request,
    video_request,
)
from engine_utils import hippo_config as _hippo_config

pytestmark = pytest.mark.engine

K = 3
LONG = 100  # tokens per request in the preemption test
PREEMPTED = 5  # requests in it: more than the cache holds at full length
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}[ENGINE_DEFAULTS["dtype"]]
TARGET_KV_BYTES_PER_TOKEN = 3 * 2 * 2 * 32 * DTYPE_BYTES  # layers x (K, V) x kv heads x head_dim x dtype
DRAFT_KV_BYTES_PER_TOKEN = 1 * 2 * 2 * 32 * DTYPE_BYTES  # the tiny draft's single layer
QUESTIONS = ("Describe this video.", "What moves in the video?", "Which colours appear?")


SCHEDULES = pytest.mark.parametrize("parallel", [False, True], ids=["serial", "vpsd"])


def hippo_config(model, parallel=None, **overrides):
    return _hippo_config(model, K, parallel, **overrides)


def spec_counters(llm) -> dict[str, float]:
    wanted = ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
              "vllm:spec_decode_num_accepted_tokens")
    return {m.name: m.value for m in llm.get_metrics() if m.name in wanted}


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer):
    return tiny_tokenizer


@pytest.fixture(scope="module")
def requests(tiny, tokenizer):
    """Text and video prompts, two different videos, mixed lengths."""
    videos = tiny.synthetic_videos
    reqs = [video_request(tokenizer, QUESTIONS[i % 3], videos[i % len(videos)]) for i in range(4)]
    reqs += [text_request(tokenizer, q) for q in QUESTIONS]
    reqs.append(video_request(tokenizer, "Tell me everything about the objects and their motion.", videos[0]))
    return reqs


@pytest.fixture(scope="module")
def baselines(tiny, requests, session_results):
    """The target alone with given engine overrides, computed when first asked for (once per
    session: test_draft_worker_lossless compares with the same outputs)."""
    outputs = session_results.setdefault("hippo_lossless_baselines", {})

    def of(variant: dict) -> dict:
        key = repr(sorted(variant.items()))
        if key not in outputs:
            with engine(tiny.target, **variant) as llm:
                single = llm.generate(requests, greedy(24), use_tqdm=False)
                outputs[key] = {"single": [tuple(o.outputs[0].token_ids) for o in single],
                                "mixed": _mixed_batch(llm, requests)}
                if not variant:  # the preemption and stop tests run with the profile's settings only
                    outputs[key]["long"] = generate_ids(llm, requests, max_tokens=LONG)
                    params = _stop_params(single)
                    outputs[key]["stops"] = (params, llm.generate(requests * 2, params, use_tqdm=False))
        return outputs[key]

    return of


@pytest.fixture(scope="module")
def baseline(baselines):
    return baselines({})


def _stop_params(outputs) -> list:
    """Sampling params for ``requests * 2``: each request once stopping on a token the target
    emits mid-output (its 10th), once on a string it writes (3 characters from the middle)."""
    from vllm import SamplingParams

    on_token = [SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=[o.outputs[0].token_ids[9]])
                for o in outputs]
    texts = [o.outputs[0].text for o in outputs]
    on_string = [SamplingParams(temperature=0.0, max_tokens=24, stop=[t[len(t) // 2:][:3]]) for t in texts]
    return on_token + on_string


def _mixed_batch(llm, requests):
    """All requests at once, each with its own max_tokens (some end mid-draft)."""
    from vllm import SamplingParams

    params = [SamplingParams(temperature=0.0, max_tokens=5 + 3 * i, ignore_eos=True)
              for i in range(len(requests))]
    outputs = llm.generate(requests, params, use_tqdm=False)
    return [tuple(o.outputs[0].token_ids) for o in outputs]


# A compiled engine starts in 10-30 s on 2 cores instead of 3-4 s: compiled, only
# the schedule users get by default.
@pytest.mark.parametrize("parallel, variant", schedule_matrix(both=("fp32", "bf16"), default_only=("bf16-compiled",)))
def test_tiny_draft_is_lossless_on_text_video_and_a_mixed_batch(parallel, variant, tiny, requests, baselines):
    baseline = baselines(variant)
    with engine(tiny.target, speculative_config=hippo_config(tiny.draft, parallel), **variant) as llm:
        assert generate_ids(llm, requests, max_tokens=24) == baseline["single"]
        assert _mixed_batch(llm, requests) == baseline["mixed"]
        counters = spec_counters(llm)
        proposer = proposer_of(llm)
        stats = proposer.stats
    assert counters["vllm:spec_decode_num_draft_tokens"] > 0
    assert stats.video_tokens_total > 0
    # keep_ratio 0.1 of each 64-token video: 7 tokens seen per video prompt
    assert stats.video_tokens_seen == 7 * (stats.video_tokens_total // 64)
    assert stats.views_without_target_attention == 0
    # In the target's process draft-then-verify drafts for every request from the step right
    # after its first token (its draft's encode and prefill run in that step's sequence); VPSD's
    # step after the first token is conservative by design (its first chunk is drafted beside it).
    assert stats.first_drafts > 0
    if parallel:
        assert stats.first_draft_steps >= 2 * stats.first_drafts
    else:
        assert stats.first_draft_steps == stats.first_drafts


# One engine for both: the self-draft that sees everything is also where drafted
# chunks are long enough for stops to fall inside them.
@SCHEDULES
def test_self_draft_keep_all_accepts_everything_and_stops_inside_chunks_like_the_target(
        parallel, tiny, requests, baseline):
    config = hippo_config(tiny.target, parallel, keep_ratio=1.0)
    with engine(tiny.target, speculative_config=config) as llm:
        assert generate_ids(llm, requests, max_tokens=24) == baseline["single"]
        counters = spec_counters(llm)
        stats = proposer_of(llm).stats
        drafted = counters["vllm:spec_decode_num_draft_tokens"]
        accepted = counters["vllm:spec_decode_num_accepted_tokens"]
        assert drafted > 0 and accepted / drafted >= 0.99, counters
        if parallel:
            # Each chunk's first token is verified against the target's own token.
            assert stats.round_accepted_tokens / stats.round_drafted_tokens >= 0.99
            assert stats.optimistic_rounds > stats.conservative_rounds
            # Every verified token is accepted: a step commits K tokens (K-1 spec + 1),
            # and every step of every request is accounted, the last ones included.
            assert stats.committed_tokens == sum(len(ids) for ids in baseline["single"])
            assert stats.committed_tokens / stats.target_forwards > K - 1
            assert stats.mat_sum / stats.mat_runs > 2 * K

        # Stop on a token that the target emits mid-output, and on a string it writes.
        params, target_stops = baseline["stops"]
        hippo_stops = llm.generate(requests * 2, params, use_tqdm=False)
        assert spec_counters(llm)["vllm:spec_decode_num_accepted_tokens"] > accepted
    for ours, theirs in zip(hippo_stops, target_stops, strict=True):
        assert ours.outputs[0].token_ids == theirs.outputs[0].token_ids
        assert ours.outputs[0].text == theirs.outputs[0].text
        assert ours.outputs[0].finish_reason == theirs.outputs[0].finish_reason == "stop"


@SCHEDULES
def test_self_draft_pruned_is_lossless_and_sees_a_tenth(parallel, tiny, requests, baseline):
    with engine(tiny.target, speculative_config=hippo_config(tiny.target, parallel, keep_ratio=0.1)) as llm:
        assert generate_ids(llm, requests, max_tokens=24) == baseline["single"]
        assert counter(llm, "vllm:spec_decode_num_draft_tokens") > 0


@SCHEDULES
def test_chunked_prefill_is_lossless_and_selects_the_same_tokens(parallel, tiny, requests, baseline):
    # Views are freed when requests finish; keep them by reading during generation.
    kept = {}
    for label, chunk in (("whole", 1024), ("chunked", 40)):
        overrides = {"max_num_batched_tokens": chunk, "enable_chunked_prefill": True}
        with engine(tiny.target, speculative_config=hippo_config(tiny.draft, parallel), **overrides) as llm:
            views = recording_views(llm)
            assert generate_ids(llm, requests, max_tokens=24) == baseline["single"]
            assert counter(llm, "vllm:spec_decode_num_draft_tokens") > 0
            if PROFILE != "gpu":
                assert proposer_of(llm).stats.views_without_target_attention == 0
            # On a GPU a chunk of 1+K tokens alone in its step replays a FULL CUDA graph,
            # which the capture never sees: that view correctly comes without s_attn
            # (test_gpu_deployment forces the case); the others must agree.
            kept[label] = [(view.keep_rows.tolist(), view.attention_used) for view in views]
    assert len(kept["whole"]) == len(kept["chunked"])
    for (whole, used_whole), (chunked, used_chunked) in zip(kept["whole"], kept["chunked"]):
        if used_whole and used_chunked:
            assert whole == chunked


def test_fp8_kv_cache_with_chunked_prefill_is_lossless_and_scores_every_video(tiny, requests, baselines):
    # s_attn reads fp8 keys from the cache (dequantised with each layer's key scale) and,
    # where vLLM quantises the query for an fp8 cache (CUDA backends), the query at its scale.
    overrides = {"kv_cache_dtype": "fp8", "max_num_batched_tokens": 40, "enable_chunked_prefill": True}
    expected = baselines(overrides)["single"]
    with engine(tiny.target, speculative_config=hippo_config(tiny.draft), **overrides) as llm:
        assert generate_ids(llm, requests, max_tokens=24) == expected
        assert counter(llm, "vllm:spec_decode_num_draft_tokens") > 0
        assert proposer_of(llm).stats.views_without_target_attention == 0
        assert proposer_of(llm).stats.target_attention_seconds > 0


@SCHEDULES
def test_preemption_under_a_small_kv_cache_is_lossless(parallel, tiny, requests, baseline):
    # Three 128-token blocks for up to four running requests of ~200 tokens each:
    # the scheduler has to preempt and later recompute requests. The draft's cache
    # (taken from the same budget) holds them all, so only the target's is short.
    draft_tokens = 4 * 256
    overrides = {"kv_cache_memory_bytes": 3 * 128 * TARGET_KV_BYTES_PER_TOKEN + draft_tokens * DRAFT_KV_BYTES_PER_TOKEN,
                 "max_model_len": 256, "max_num_batched_tokens": 256}
    config = hippo_config(tiny.draft, parallel, draft_kv_tokens=draft_tokens)
    with engine(tiny.target, speculative_config=config, **overrides) as llm:
        worker = draft_worker_of(llm)
        prefilled, prepare = [], worker._prepare_prefill

        def recording_prepare(req_id, *args):
            prefilled.append((req_id, [f.identifier for f in worker._prompts[req_id].mm_features]))
            return prepare(req_id, *args)

        worker._prepare_prefill = recording_prepare
        assert generate_ids(llm, requests[:PREEMPTED], max_tokens=LONG) == baseline["long"][:PREEMPTED]
        preemptions = counter(llm, "vllm:num_preemptions")
        drafted = spec_counters(llm)["vllm:spec_decode_num_draft_tokens"]
        stats = proposer_of(llm).stats
    assert preemptions > 0 and drafted > 0
    # A preempted video request is prefilled again from its kept rows, and requests about
    # the same video share its encode: each video is encoded once.
    video_prefills = [req_id for req_id, items in prefilled if items]
    assert len(video_prefills) > len(set(video_prefills))
    assert len(set(video_prefills)) == sum("multi_modal_data" in r for r in requests[:PREEMPTED])
    videos = {identifier for _, items in prefilled for identifier in items}
    assert stats.draft_encodes == len(videos) < len(set(video_prefills))


@pytest.mark.parametrize(
    "overrides",
    [
        {"pruning": "attention"},
        {"pruning": "uniform"},
        {"pruning": "temporal"},
        {"pruning": "specvlm"},
        {"pruning": "none"},
        {"score_weights": {"attn": 0, "temp": 1, "spa": 0}, "selection": "per_frame"},
        {"attn_layers": [0], "crop_size": 3},
    ],
    ids=["attention", "uniform", "temporal", "specvlm", "none", "temp-only-per-frame", "layer0-crop3"],
)
def test_pruning_baselines_and_ablations_are_lossless(tiny, requests, baseline, overrides):
    with engine(tiny.target, speculative_config=hippo_config(tiny.draft, **overrides)) as llm:
        assert generate_ids(llm, requests[:4], max_tokens=24) == baseline["single"][:4]
        assert counter(llm, "vllm:spec_decode_num_draft_tokens") > 0
        stats = proposer_of(llm).stats
    # 64 tokens per video in 4 frames of 16: ceil(0.1 * 64) = 7 kept globally,
    # ceil(0.1 * 16) = 2 per frame with the per-frame quota.
    per_video = {"none": 64}.get(overrides.get("pruning"), 8 if "selection" in overrides else 7)
    assert stats.video_tokens_seen == per_video * stats.video_tokens_total // 64


def random_aborts(llm, requests, num_requests: int) -> None:
    """Add ``num_requests`` requests one engine step apart, abort 40% of them at random, run to the end."""
    rng = random.Random(0)
    core = llm.llm_engine
    live = []
    for n in range(num_requests):
        req_id = f"r{n}"
        core.add_request(req_id, requests[n % len(requests)], greedy(rng.randint(1, 12)))
        live.append(req_id)
        core.step()
        if rng.random() < 0.4:
            core.abort_request([live.pop(rng.randrange(len(live)))])
    while core.has_unfinished_requests():
        core.step()
    # vLLM reports finished requests to the worker with the next scheduled step;
    # a last one-token request is that step (and itself needs no draft).
    core.add_request("last", requests[0], greedy(1))
    while core.has_unfinished_requests():
        core.step()


@SCHEDULES
def test_random_aborts_release_every_draft_request(parallel, tiny, requests):
    with engine(tiny.target, speculative_config=hippo_config(tiny.draft, parallel)) as llm:
        random_aborts(llm, requests, 100)
        proposer, draft = proposer_of(llm), draft_worker_of(llm)
        assert proposer.stats.draft_tokens > 0
        assert proposer.num_draft_requests == 0
        assert proposer.num_views == 0
        # The draft's side holds nothing of them either.
        assert draft.num_draft_requests == draft.num_views == draft.num_prompts == 0
        assert draft.engine.num_requests == 0
        assert draft.engine.num_used_blocks == 0
