"""The s_attn benchmark runs, checks the kernel against the torch path and writes its rows.

No timing assertions: wall times on a shared CI machine say nothing about the code.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_small_run_writes_every_geometry_and_size(tmp_path):
    out = tmp_path / "target_attention.json"
    done = subprocess.run(
        [sys.executable, "benchmarks/bench_target_attention.py", "--device", "cpu", "--sizes", "200,300",
         "--repeats", "1", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    assert [(row["geometry"], row["video_tokens"]) for row in result["rows"]] == [
        (geometry, size) for geometry in ("7b", "72b", "72b-tp4") for size in (200, 300)]
    for row in result["rows"]:
        assert row["floor_s"] > 0 and row["kernel_s"] > 0 and row["torch_s"] > 0
    assert {"copy_bytes_per_s", "matrix_flop_per_s", "exp_per_s"} <= set(result["rates"])
    assert "kernel/floor" in done.stdout


def test_unknown_geometries_are_refused():
    done = subprocess.run([sys.executable, "benchmarks/bench_target_attention.py", "--geometries", "7b,13b"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "--geometries: unknown ['13b']" in done.stderr
