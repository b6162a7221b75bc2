"""Spec-decode and hippo metrics: correct, and visible in logs, /metrics and get_metrics().

The spec-decode counters are checked against counts that do not come from vLLM's
stats: with a self-draft that sees everything (greedy, in float32 and bfloat16)
every draft is accepted, so each round commits k + 1 tokens and the number of
rounds follows from max_tokens alone; drafted tokens also equal the proposer's own count. The hippo
figures are checked against the proposer's ``HippoStats`` in the worker, in-process
and across the processes of ``vllm serve``.
"""

from __future__ import annotations

import base64
import logging
import re
import sys
import time
from pathlib import Path

import pytest

from engine_utils import (
    engine,
    generate_ids,
    numeric_variants,
    product_default,
    proposer_of,
    serve_args,
    text_request,
    video_request,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from server_process import read_metrics, running_server  # noqa: E402
from engine_utils import hippo_config as _hippo_config
from hippo_vllm.logs import ROOT_LOGGER_NAME

K = 3
VIDEO_TOKENS = 64  # 8 frames of 112x112 -> grid (4, 8, 8)
# Prefill commits 1 token, each fully accepted round k + 1, the last step 1: with
# max_tokens = 2 + n (k + 1) every round can draft all k tokens.
ROUNDS = 6
MAX_TOKENS = 2 + ROUNDS * (K + 1)

SPEC = "vllm:spec_decode_num_"


def hippo_config(model, **overrides):
    return _hippo_config(model, K, **overrides)


def metrics_by_name(llm) -> dict:
    """get_metrics() as name -> value (counters) or values (vectors); one engine."""
    return {m.name: getattr(m, "values", getattr(m, "value", None)) for m in llm.get_metrics()}


def settled_metrics(llm, stats) -> dict:
    """get_metrics() once the worker's snapshot has caught up with all its counters
    (the last steps of a generation may land in the next snapshot)."""
    from hippo_vllm.vllm.metrics.export import read_snapshot, worker_snapshot_path

    path = worker_snapshot_path(proposer_of(llm).vllm_config)
    wait_for(lambda: read_snapshot(path) == stats.exported(), timeout=5)
    return metrics_by_name(llm)


def wait_for(condition, timeout: float, interval: float = 0.1):
    """Poll until condition() is truthy (returned) or fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result or time.monotonic() > deadline:
            assert result, f"condition not met within {timeout} s"
            return result
        time.sleep(interval)


def prometheus_samples(text: str) -> dict[str, list]:
    """Exposition text as sample name -> [(labels, value)]."""
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def check_spec_counters(drafts, drafted, accepted, per_pos, parallel=False):
    k = K - 1 if parallel else K  # vLLM verifies γ−1 spec tokens per step in parallel mode
    assert drafted > 0 and 0 <= accepted <= drafted <= drafts * k
    assert len(per_pos) == k and sum(per_pos) == accepted
    assert all(a >= b for a, b in zip(per_pos, per_pos[1:])), per_pos  # position i needs i-1


class LogLines(logging.Handler):
    """Collects the hippo stats lines printed through vLLM's logger tree."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())

    def __enter__(self):
        self.log = logging.getLogger(ROOT_LOGGER_NAME)
        self.level = self.log.level
        self.log.setLevel(logging.INFO)
        self.log.addHandler(self)
        return self

    def __exit__(self, *exc):
        self.log.removeHandler(self)
        self.log.setLevel(self.level)


@pytest.fixture(scope="module")
def requests(tiny, tiny_tokenizer):
    videos = tiny.synthetic_videos
    return [
        video_request(tiny_tokenizer, "Describe this video.", videos[0]),
        video_request(tiny_tokenizer, "What moves in the video?", videos[1 % len(videos)]),
        text_request(tiny_tokenizer, "Which colours are warm?"),
    ]


# -- without an engine -----------------------------------------------------------------


def test_every_counter_is_exported_under_vllm_names():
    from hippo_vllm.vllm.metrics.stats import EXPORTED_STATS, HippoStats, metric_name

    assert set(EXPORTED_STATS) == set(HippoStats().as_dict())
    assert {metric_name(field) for field in EXPORTED_STATS} >= {
        "vllm:hippo_video_tokens_total", "vllm:hippo_video_tokens_seen_total",
        "vllm:hippo_pruning_seconds_total", "vllm:hippo_draft_views_total",
        "vllm:hippo_views_without_target_attention_total", "vllm:hippo_drafting_failures_total",
        "vllm:hippo_target_attention_seconds_total"}


def test_snapshot_round_trip_survives_a_bad_file_and_is_removed_on_close(tmp_path):
    from hippo_vllm.vllm.metrics.stats import HippoStats
    from hippo_vllm.vllm.metrics.export import SnapshotReader, StatsPublisher

    class Proposer:  # what the publisher needs of HippoProposer
        stats = HippoStats(draft_views=2, video_tokens_total=128, video_tokens_seen=14)

    proposer, path = Proposer(), tmp_path / "snapshot.json"
    reader = SnapshotReader(path)
    assert reader.read()["draft_views"] == 0  # nothing published yet: zeros
    publisher = StatsPublisher(proposer, path, interval=0.05)
    publisher.start()
    wait_for(lambda: reader.read()["video_tokens_seen"] == 14, timeout=2)
    proposer.stats.record_drafts(5)
    wait_for(lambda: reader.read()["draft_tokens"] == 5, timeout=2)
    path.write_text("{not json")  # a reader must keep the last good values
    with LogLines() as log:
        assert reader.read()["draft_tokens"] == 5 and reader.read()["draft_tokens"] == 5
    assert len([line for line in log.lines if "snapshot" in line]) == 1
    publisher.close()
    assert not path.exists()


def test_log_line_reads_like_vllms_stats_lines():
    from hippo_vllm.vllm.metrics.stat_logger import format_log_line

    delta = {"draft_views": 4, "video_tokens_total": 64, "video_tokens_seen": 7,
             "pruning_seconds": 0.0048, "views_without_target_attention": 1, "draft_tokens": 30}
    fmt, args = format_log_line(delta)
    assert fmt % tuple(args) == (
        "hippo: draft saw 7/64 video tokens (10.9%), 4 views, pruning 1.2 ms/view, "
        "1 without target attention")
    fmt, args = format_log_line({**delta, "video_tokens_total": 0, "video_tokens_seen": 0,
                                 "views_without_target_attention": 0})
    assert fmt % tuple(args) == "hippo: draft saw 0/0 video tokens, 4 views, pruning 1.2 ms/view"
    rounds = {"target_forwards": 20, "committed_tokens": 46, "mat_sum": 33, "mat_runs": 8,
              "optimistic_rounds": 12, "conservative_rounds": 8}
    fmt, args = format_log_line({**delta, "draft_views": 0, **rounds})
    assert fmt % tuple(args) == (
        "hippo: MAT (PEARL, +1) 4.12, 2.30 tokens/target forward, rounds 12 optimistic / 8 conservative")
    fmt, args = format_log_line({**delta, "target_attention_seconds": 0.0123})
    assert fmt % tuple(args) == (
        "hippo: draft saw 7/64 video tokens (10.9%), 4 views, pruning 1.2 ms/view, "
        "1 without target attention, s_attn capture 12.3 ms")
    fmt, args = format_log_line({**delta, "draft_views": 0, "drafting_failures": 2})
    assert fmt % tuple(args) == "hippo: 2 drafting failures"
    fmt, args = format_log_line({**delta, **rounds, "mat_runs": 0, "mat_sum": 0})
    assert (fmt % tuple(args)).endswith(
        "1.2 ms/view, 1 without target attention, MAT (PEARL, +1) n/a, 2.30 tokens/target forward, "
        "rounds 12 optimistic / 8 conservative")
    fmt, args = format_log_line({**delta, "draft_views": 0, "draft_kv_full": 3})
    assert fmt % tuple(args) == "hippo: 3 request steps without drafts (draft KV cache full)"
    worker = {"draft_round_trips": 4, "draft_round_trip_seconds": 0.1, "draft_wait_seconds": 0.02,
              "draft_dropped_steps": 2, "draft_worker_restarts": 1, "draft_worker_down_seconds": 12.34}
    fmt, args = format_log_line({**delta, "draft_views": 0, **worker})
    assert fmt % tuple(args) == (
        "hippo: draft worker 25.0 ms/round trip, target waited 5.0 ms/step, "
        "2 steps without drafts (draft worker late or down), 1 draft worker restarts, "
        "drafting off 12.3 s (draft worker down)")


# -- in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0, set by conftest) ----------------


@pytest.mark.engine
@pytest.mark.parametrize("variant", numeric_variants("fp32", "bf16"))
def test_self_draft_counters_match_an_independent_count_and_hippo_figures_reach_process_0(tiny, requests, variant):
    from prometheus_client import REGISTRY, generate_latest

    from hippo_vllm.vllm.metrics.stats import EXPORTED_STATS, metric_name
    from hippo_vllm.vllm.metrics.export import worker_snapshot_path

    # Draft-then-verify: the independent count below is that schedule's.
    config = hippo_config(tiny.target, keep_ratio=1.0, parallel=False)
    with engine(tiny.target, speculative_config=config, **variant) as llm, LogLines() as log:
        outputs = generate_ids(llm, requests, max_tokens=MAX_TOKENS)
        assert all(len(ids) == MAX_TOKENS for ids in outputs)
        stats = proposer_of(llm).stats
        metrics = settled_metrics(llm, stats)
        llm.llm_engine.do_log_stats()
        llm.llm_engine.do_log_stats()  # nothing new since the last line: no second hippo line
        exposition = prometheus_samples(generate_latest(REGISTRY).decode())
        snapshot = worker_snapshot_path(proposer_of(llm).vllm_config)
        assert snapshot.exists()

    drafts, drafted = metrics[SPEC + "drafts"], metrics[SPEC + "draft_tokens"]
    accepted, per_pos = metrics[SPEC + "accepted_tokens"], metrics[SPEC + "accepted_tokens_per_pos"]
    check_spec_counters(drafts, drafted, accepted, per_pos)
    # The self-draft sees the whole prompt: every token is accepted, so each request
    # takes exactly ROUNDS rounds of K tokens.
    assert accepted == drafted == drafts * K == len(requests) * ROUNDS * K
    assert per_pos == [len(requests) * ROUNDS] * K
    assert drafted == stats.draft_tokens

    videos = sum("multi_modal_data" in request for request in requests)
    assert stats.video_tokens_total == videos * VIDEO_TOKENS
    for field in EXPORTED_STATS:
        sample = metric_name(field)  # get_metrics() names the family, without "_total"
        if not isinstance(getattr(stats, field), float):  # get_metrics() truncates counters to int
            assert metrics[sample.removesuffix("_total")] == getattr(stats, field), field
        [(labels, value)] = exposition[sample]
        assert labels == {"model_name": str(tiny.target), "engine": "0"}
        assert value == pytest.approx(getattr(stats, field)), field
    assert metrics["vllm:hippo_video_tokens_seen"] == metrics["vllm:hippo_video_tokens"]

    [line] = [line for line in log.lines if line.startswith("hippo:")]
    assert re.fullmatch(
        rf"hippo: draft saw {videos * VIDEO_TOKENS}/{videos * VIDEO_TOKENS} video tokens \(100\.0%\), "
        rf"{len(requests)} views, pruning \d+\.\d ms/view, s_attn capture \d+\.\d ms", line), line
    assert stats.target_attention_seconds > 0  # the prefills' s_attn, from the KV cache
    assert not snapshot.exists()  # the engine's shutdown removed it


@pytest.mark.engine
@pytest.mark.parametrize("variant", numeric_variants("fp32", "bf16"))
def test_parallel_mode_reports_mat_and_tokens_per_forward(tiny, requests, variant):
    """VPSD's figures reach get_metrics() and the log line; a self-draft is never rejected."""
    config = hippo_config(tiny.target, keep_ratio=1.0, parallel=True)
    with engine(tiny.target, speculative_config=config, **variant) as llm, LogLines() as log:
        outputs = generate_ids(llm, requests, max_tokens=MAX_TOKENS)
        stats = proposer_of(llm).stats
        metrics = settled_metrics(llm, stats)
        llm.llm_engine.do_log_stats()

    assert stats.committed_tokens == sum(len(ids) for ids in outputs)
    for field in ("target_forwards", "committed_tokens", "mat_sum", "mat_runs",
                  "optimistic_rounds", "conservative_rounds"):
        assert metrics[f"vllm:hippo_{field}"] == getattr(stats, field), field
    # Nothing is rejected: each request's accepted draft tokens form one run, recorded
    # when it ends (its first token and a last step without draft are the target's own).
    assert stats.round_accepted_tokens == stats.round_drafted_tokens > 0
    assert stats.mat_runs == len(requests)
    assert stats.mat_sum == stats.round_accepted_tokens
    mat, per_forward = stats.mat_sum / stats.mat_runs, stats.committed_tokens / stats.target_forwards
    [line] = [line for line in log.lines if line.startswith("hippo:")]
    assert f"MAT (PEARL, +1) {mat:.2f}, {per_forward:.2f} tokens/target forward" in line, line


@pytest.mark.engine
def test_vllm_serve_multiprocess_exposes_spec_decode_and_hippo_metrics_and_logs_the_line(tiny, tmp_path):
    """API server, engine core and worker are three processes; the tiny draft sees a tenth."""
    from hippo_vllm.vllm.metrics.stats import EXPORTED_STATS, metric_name

    from openai import OpenAI

    log_path = tmp_path / "server.log"
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_LOGGING_LEVEL": "INFO", "VLLM_LOG_STATS_INTERVAL": "1"}
    args = serve_args(tiny.video_dir, speculative_config=hippo_config(tiny.draft))
    with running_server(tiny.target, args, log_path, env=env, timeout=150) as server:
        video = base64.b64encode(tiny.synthetic_videos[0].read_bytes()).decode()
        reply = OpenAI(base_url=server.openai_base_url, api_key="unused").chat.completions.create(
            model="tiny", max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True},
            messages=[{"role": "user", "content": [
                {"type": "video_url", "video_url": {"url": f"data:video/mp4;base64,{video}"}},
                {"type": "text", "text": "Describe this video."}]}],
        )
        assert reply.usage.completion_tokens == MAX_TOKENS

        def scraped():
            samples = {}
            for sample in read_metrics(server.base_url):
                samples.setdefault(sample.name, []).append((sample.labels, sample.value))
            ours = samples.get("vllm:hippo_draft_tokens_total", [])
            drafted = samples.get(SPEC + "draft_tokens_total", [(None, 0)])[0][1]
            return samples if ours and ours[0][1] == drafted > 0 else None

        samples = wait_for(scraped, timeout=10, interval=0.5)
        value = {name: entries[0][1] for name, entries in samples.items() if len(entries) == 1}
        per_pos = [v for _, v in sorted(samples[SPEC + "accepted_tokens_per_pos_total"],
                                        key=lambda entry: int(entry[0]["position"]))]
        drafted, accepted = value[SPEC + "draft_tokens_total"], value[SPEC + "accepted_tokens_total"]
        check_spec_counters(value[SPEC + "drafts_total"], drafted, accepted, per_pos, product_default("parallel"))
        assert accepted < drafted  # the tiny draft is not the target
        for field in EXPORTED_STATS:
            [(labels, _)] = samples[metric_name(field)]
            assert labels == {"model_name": "tiny", "engine": "0"}
        total, seen = value["vllm:hippo_video_tokens_total"], value["vllm:hippo_video_tokens_seen_total"]
        assert value["vllm:hippo_draft_views_total"] == 1 and total > 0
        assert seen == -(-total // 10)  # keep_ratio 0.1, rounded up
        assert value["vllm:hippo_pruning_seconds_total"] > 0
        assert value["vllm:hippo_target_attention_seconds_total"] > 0
        wait_for(lambda: f"hippo: draft saw {int(seen)}/{int(total)} video tokens" in log_path.read_text(),
                 timeout=10, interval=0.5)
