"""`vllm serve` with a bad hippo config stops at start-up with one clear message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from server_process import VLLM_EXECUTABLE, fast_cpu_serve_args  # noqa: E402

from hippo_vllm.vllm.seam.config_rewrite import REFUSAL  # noqa: E402

pytestmark = pytest.mark.engine

# name: (the change to a good hippo speculative_config, the message start-up must print)
BAD_CONFIGS = {
    "keep_ratio": ({"keep_ratio": 1.5},
                   'speculative_config["keep_ratio"]=1.5 is not allowed: a number in [0, 1]'),
    "unknown-key": ({"keep_rato": 0.1}, "Unknown key(s) ['keep_rato'] in the hippo speculative_config"),
    "draft-worker-placement": ({"draft_worker": {"placement": "thread"}},
                               'speculative_config["draft_worker"]["placement"]=\'thread\' is not allowed: one of '
                               "['in_process', 'process', 'ray']"),
}


@pytest.fixture(scope="module")
def refused_servers(tiny) -> dict[str, tuple[int, str]]:
    """(exit status, output) of `vllm serve` with each bad config.

    Start-up fails while vLLM builds its config, before any model is loaded, so
    each run takes only the import time and never binds its port. The runs are
    independent and mostly single-threaded, so they are started side by side, on
    as many cores as there are.
    """
    servers = {}
    try:
        for name, (change, _) in BAD_CONFIGS.items():
            config = {"method": "hippo", "model": str(tiny.draft), **change}
            args = fast_cpu_serve_args(tiny.video_dir, speculative_config=config)
            servers[name] = subprocess.Popen(
                [str(VLLM_EXECUTABLE), "serve", str(tiny.target), "--port", "1", *args],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
            )
        results = {}
        for name, server in servers.items():
            stdout, stderr = server.communicate(timeout=180)
            results[name] = (server.returncode, stdout + stderr)
        return results
    finally:
        for server in servers.values():
            if server.poll() is None:
                server.kill()
                server.wait()


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_bad_hippo_config_stops_the_server_with_the_message(refused_servers, name):
    returncode, output = refused_servers[name]
    assert returncode != 0
    assert BAD_CONFIGS[name][1] in output, output[-3000:]
    assert "HippoConfigError" in output
    # One line says it all, before vLLM's traceback.
    (line,) = [line for line in output.splitlines() if REFUSAL in line]
    assert BAD_CONFIGS[name][1] in line
    assert output.index(line) < output.index("Traceback (most recent call last)")
