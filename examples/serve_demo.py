"""Serving demo: `vllm serve` with "method": "hippo", asked about a video over the OpenAI API.

Serves the target/draft pair trained on the synthetic video task (its weights ship with
the repository) with

    vllm serve TARGET --speculative-config \\
        '{"method":"hippo","model":DRAFT,"num_speculative_tokens":3}'

on 127.0.0.1 (a free port, vLLM's default multiprocess layout), asks for the
description of a held-out task video through the `openai` client, prints the model's
answer beside the true one and the acceptance figures from the server's `/metrics`,
and stops the server. Drafting runs in the default draft-then-verify mode; pass
`--parallel` for VPSD's schedule. The answer is exactly the target's own (the tests in
tests/server/ check that against a server without speculation); the draft sees the
video, so most of its tokens are accepted.

`--random` serves the tiny pair with random weights instead (its answer is gibberish)
and asks about one of its sample mp4s.

Run with `make demo` (or `.venv/bin/python examples/serve_demo.py`).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from hippo_testbed import build_fixtures, video_task
from hippo_testbed.trained_pair import build_trained_pair

# examples/ is sys.path[0] when this file runs as a script.
from server_process import MetricSample, fast_cpu_serve_args, metric_totals, read_metrics, running_server

SERVED_NAME = "hippo-tiny"
NUM_SPECULATIVE_TOKENS = 3
# vLLM's default layout: API server, engine-core process, worker process.
# Measured on 2 cores: healthy after ~30 s, against ~22 s with
# VLLM_ENABLE_V1_MULTIPROCESSING=0 (worker inside the engine-core process, as the
# tests run it). The extra ~8 s are worth it here: this is how users deploy, and
# only this layout shows the hippo worker, its draft engine and its metrics
# working from a worker process of their own.
SERVER_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
START_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 120
# vLLM's spec-decode counters are current once a response is back; hippo's reach the
# API server through a snapshot the worker rewrites every 0.5 s, so wait that out.
METRICS_SETTLE_S = 1.5

SPEC_COUNTERS = {
    "drafts": "vllm:spec_decode_num_drafts_total",
    "drafted": "vllm:spec_decode_num_draft_tokens_total",
    "accepted": "vllm:spec_decode_num_accepted_tokens_total",
}
PER_POSITION = "vllm:spec_decode_num_accepted_tokens_per_pos_total"
HIPPO_PREFIX = "vllm:hippo_"
HIPPO_VIDEO_TOTAL = "vllm:hippo_video_tokens_total"
HIPPO_VIDEO_SEEN = "vllm:hippo_video_tokens_seen_total"


def ask_about_video(base_url: str, video: Path, question: str, max_tokens: int):
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="unused", timeout=REQUEST_TIMEOUT_S, max_retries=0)
    return client.chat.completions.create(
        model=SERVED_NAME,
        messages=[{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": video.resolve().as_uri()}},
            {"type": "text", "text": question},
        ]}],
        max_tokens=max_tokens,
        temperature=0.0,
    )


def print_acceptance(samples: list[MetricSample]) -> None:
    totals = metric_totals(samples)
    drafts, drafted, accepted = (totals.get(name, 0.0) for name in SPEC_COUNTERS.values())
    print("speculative decoding (vLLM's counters from /metrics):")
    print(f"  drafts {drafts:.0f}, drafted tokens {drafted:.0f}, accepted tokens {accepted:.0f}")
    if drafted:
        # vLLM's definitions: accepted share of drafted tokens, and tokens emitted per
        # target step (the accepted drafts plus the target's own token).
        print(f"  acceptance rate {accepted / drafted:.1%}, "
              f"mean acceptance length {1 + accepted / drafts:.2f} tokens per target step")
    per_position = sorted(
        (int(s.labels["position"]), s.value) for s in samples if s.name == PER_POSITION
    )
    if per_position and drafts:
        shares = ", ".join(f"#{pos + 1} {value / drafts:.0%}" for pos, value in per_position)
        print(f"  accepted by draft position: {shares}")

    hippo = {name: value for name, value in totals.items() if name.startswith(HIPPO_PREFIX)}
    if not hippo:
        print("hippo metrics: none exposed by this plugin version")
        return
    # Counters of features this run does not use (e.g. parallel rounds) stay at 0.
    idle = sum(1 for value in hippo.values() if not value)
    print(f"hippo metrics ({idle} counters at 0 not shown):" if idle else "hippo metrics:")
    for name, value in sorted(hippo.items()):
        if value:
            print(f"  {name} {value:g}")
    if hippo.get(HIPPO_VIDEO_TOTAL):
        seen_share = hippo.get(HIPPO_VIDEO_SEEN, 0.0) / hippo[HIPPO_VIDEO_TOTAL]
        print(f"  the draft saw {seen_share:.1%} of the video tokens the target saw")
    forwards = hippo.get(HIPPO_PREFIX + "target_forwards_total")
    if forwards:
        # In parallel mode vLLM's counters miss each chunk's first token, which is
        # checked against the target's own token; hippo's round counters have both.
        committed = hippo.get(HIPPO_PREFIX + "committed_tokens_total", 0.0)
        runs = hippo.get(HIPPO_PREFIX + "mat_runs_total", 0.0)
        mat = f"{hippo.get(HIPPO_PREFIX + 'mat_sum_total', 0.0) / runs:.2f}" if runs else "n/a"
        print(f"  parallel rounds: {committed / forwards:.2f} tokens per target forward, "
              f"MAT (PEARL, +1) {mat}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--video", type=Path, help="an mp4 to ask about (default: a generated one)")
    parser.add_argument("--question", help="default: the task's description question ("
                        "\"Describe this video.\" with --random)")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--parallel", action="store_true", help="VPSD's schedule instead of draft-then-verify")
    parser.add_argument("--random", action="store_true",
                        help="the tiny pair with random weights instead of the trained pair")
    parser.add_argument("--held-out", type=int, default=0, metavar="N",
                        help="ask about the N-th held-out task video (default 0)")
    args = parser.parse_args()

    expected = None
    if not args.random:
        print("loading the trained target/draft pair (cached after the first run)")
        fixtures = build_trained_pair()
        if args.video is None:
            if not 0 <= args.held_out < len(video_task.HELD_OUT_SEEDS):
                parser.error(f"--held-out must be in [0, {len(video_task.HELD_OUT_SEEDS)}), got {args.held_out}")
            sample = video_task.make_sample(video_task.HELD_OUT_SEEDS[args.held_out])
            qa = next(qa for qa in sample.qa if qa.topic == "describe")
            expected = qa.answer if args.question in (None, qa.question) else None
            args.question = args.question or qa.question
            args.video = sample.write_mp4(Path(tempfile.mkdtemp(prefix="hippo_task_video_")) / "held_out.mp4")
    else:
        print("building the tiny random target/draft pair and sample videos (cached after the first run)")
        fixtures = build_fixtures()
    args.question = args.question or "Describe this video."
    video = (args.video or fixtures.synthetic_videos[0]).resolve()
    speculative_config = {"method": "hippo", "model": str(fixtures.draft),
                          "num_speculative_tokens": NUM_SPECULATIVE_TOKENS}
    if args.parallel:
        speculative_config["parallel"] = True
    serve_args = fast_cpu_serve_args(video.parent, served_model_name=SERVED_NAME,
                                     speculative_config=speculative_config)
    log_path = Path(tempfile.mkdtemp(prefix="hippo_serve_demo_")) / "server.log"
    print(f"target {fixtures.target}\ndraft  {fixtures.draft}\nvideo  {video}")
    print(f"starting vllm serve with --speculative-config '{json.dumps(speculative_config)}'")
    print(f"server log: {log_path}")

    start = time.monotonic()
    with running_server(fixtures.target, serve_args, log_path, env=SERVER_ENV, timeout=START_TIMEOUT_S,
                        progress=lambda s: print(f"  waiting for /health ... {s:.0f} s", flush=True)) as server:
        print(f"server healthy at {server.base_url} after {time.monotonic() - start:.1f} s")
        print(f"\nuser: [video {video.name}] {args.question}")
        asked = time.monotonic()
        response = ask_about_video(server.openai_base_url, video, args.question, args.max_tokens)
        choice = response.choices[0]
        print(f"assistant ({response.usage.completion_tokens} tokens, finish_reason {choice.finish_reason}, "
              f"{time.monotonic() - asked:.2f} s; prompt {response.usage.prompt_tokens} tokens):")
        print(f"  {choice.message.content!r}")
        if expected is not None:
            verdict = "the same" if choice.message.content.strip() == expected else "differs"
            print(f"the true answer ({verdict}):\n  {expected!r}")
        print()
        time.sleep(METRICS_SETTLE_S)
        print_acceptance(read_metrics(server.base_url))
        print("\nstopping the server")
    print("server stopped")


if __name__ == "__main__":
    main()
