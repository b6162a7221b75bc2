"""`vllm serve` with a bad hippo config stops at start-up with one clear message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from server_process import VLLM_EXECUTABLE, fast_cpu_serve_args  # noqa: E402

pytestmark = pytest.mark.engine


@pytest.mark.parametrize(
    "change, message",
    [
        ({"keep_ratio": 1.5}, 'speculative_config["keep_ratio"]=1.5 is not allowed: a number in [0, 1]'),
        ({"keep_rato": 0.1}, "Unknown key(s) ['keep_rato'] in the hippo speculative_config"),
        ({"draft_worker": {"placement": "thread"}},
         'speculative_config["draft_worker"]["placement"]=\'thread\' is not allowed: one of '
         "['in_process', 'process', 'ray']"),
    ],
    ids=["keep_ratio", "unknown-key", "draft-worker-placement"],
)
def test_bad_hippo_config_stops_the_server_with_the_message(tiny, change, message):
    config = {"method": "hippo", "model": str(tiny.draft), **change}
    args = fast_cpu_serve_args(tiny.video_dir, speculative_config=config)
    # Start-up fails while vLLM builds its config, before any model is loaded, so
    # this takes only the import time; the port is never bound.
    result = subprocess.run(
        [str(VLLM_EXECUTABLE), "serve", str(tiny.target), "--port", "1", *args],
        capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL,
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert message in output, output[-3000:]
    assert "HippoConfigError" in output
