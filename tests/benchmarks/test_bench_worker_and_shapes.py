"""The transport and step-shape benchmarks run end to end and report their figures.

No timing assertions: wall times on a shared CI machine say nothing about the code.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_draft_transport.py"


def test_both_wires_carry_steps_and_a_video_to_a_peer_and_back(tmp_path):
    out = tmp_path / "transport.json"
    run = subprocess.run([sys.executable, str(BENCH), "--repeats", "1", "--video-tokens", "256", "--json", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert figures["video_tokens"] == 256
    assert set(figures["results"]) == {"pickle over PAIR (before)", "vLLM ZMQ + msgpack (now)"}
    for row in figures["results"].values():
        assert row["step_round_trip_ms"] > 0 and row["video_hand_off_ms"] > 0
    assert "video hand-off" in run.stdout


def test_bad_arguments_are_refused_with_the_value():
    run = subprocess.run([sys.executable, str(BENCH), "--video-tokens", "0"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode != 0 and "--video-tokens=0: must be >= 1" in run.stderr


def test_the_step_shape_benchmark_counts_uniform_steps_per_schedule(tmp_path):
    out = tmp_path / "shapes.json"
    bench = BENCH.with_name("bench_step_shapes.py")
    run = subprocess.run([sys.executable, str(bench), "--requests", "2", "--max-tokens", "8", "--json", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert results["draft-then-verify"]["uniform_tokens"] == 4 and results["VPSD"]["uniform_tokens"] == 3
    for summary in results.values():
        assert 0 <= summary["uniform_steps"] <= summary["decode_steps"] > 0
    padded = results["draft-then-verify padded"]
    assert padded["uniform_steps"] == padded["decode_steps"]  # drafts of k tokens: every decode step 1+k
