"""Smoke run of the end-to-end benchmark: every row is there and the lossless check ran.

No timing assertions: wall times on a shared CI machine say nothing about the code.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_e2e.py"


def _load_benchmark():
    # benchmarks/ is a folder of scripts, not a package.
    spec = importlib.util.spec_from_file_location("bench_e2e", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module's annotations through it
    spec.loader.exec_module(module)
    return module


def test_quick_run_has_every_row_and_checked_losslessness(tmp_path):
    bench = _load_benchmark()
    out = tmp_path / "e2e.json"
    bench.main(["--quick", "--pairs", "tiny", "--max-tokens", "8", "--out", str(out)])
    result = json.loads(out.read_text())

    rows = {row["name"]: row for row in result["rows"]}
    assert list(rows) == ["target", "draft_model text", "hippo serial tiny", "hippo parallel tiny"]
    assert result["lossless_checked"]
    for row in rows.values():
        assert row["lossless"]["equal_to_target"]
        assert row["lossless"]["checked_outputs"] == 2 * result["settings"]["num_prompts"]  # warm-up + 1 timed
        assert row["generated_tokens"] == 8 * result["settings"]["num_prompts"]
        assert row["target_forwards"] > 0 and row["wall_seconds"] > 0
    for name in ("hippo serial tiny", "hippo parallel tiny"):
        assert 0 < rows[name]["video_tokens_seen"] < rows[name]["video_tokens_total"]
    assert rows["draft_model text"]["video_tokens_seen"] == 0
    assert rows["hippo parallel tiny"]["mat"] is not None
    assert "estimate_second_device" in rows["hippo parallel tiny"]
    assert result["environment"]["vllm"]
