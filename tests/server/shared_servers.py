"""The two real `vllm serve` processes the server tests share: a plain one and a hippo one.

Each server start costs ~20-25 s on 2 cores, so the modules here share one server of
each kind: the plain server (the target alone, same flags, no --speculative-config)
answers the references, the hippo server the requests under test. Both serve a copy of
the tiny target whose ``generation_config.json`` sets a ``top_k``, the way real
checkpoints bring a server default (test_top_k_server.py); greedy requests, which
every lossless comparison sends, are unchanged by it. They start one after the other
(two at once start slower than in turn) and stay up until the last server test; under
the gpu profile each takes 0.4 of the GPU memory, so both fit.

Both run with VLLM_ENABLE_V1_MULTIPROCESSING=0, which keeps the worker inside the
engine-core process instead of spawning one more process: healthy after ~22 s instead
of ~32 s on 2 cores. vLLM's default layout, with its own worker process, is what
`make demo` runs.

conftest.py makes the fixtures visible to the modules here; they import the constants.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from engine_utils import serve_args  # noqa: E402
from server_process import running_server  # noqa: E402

SERVED_NAME = "tiny"  # the model name both servers answer to
SERVER_TOP_K = 5  # the checkpoint's generation_config top_k
K = 3  # num_speculative_tokens of the hippo server
SERVER_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
START_TIMEOUT_S = 240


@pytest.fixture(scope="package")
def checkpoint_with_top_k(tiny, tmp_path_factory) -> Path:
    """The tiny target (links to its files) with ``top_k`` in its generation_config.json."""
    root = tmp_path_factory.mktemp("top_k_checkpoint")
    for source in tiny.target.iterdir():
        if source.name != "generation_config.json":
            (root / source.name).symlink_to(source)
    generation = json.loads((tiny.target / "generation_config.json").read_text())
    generation.update(do_sample=True, top_k=SERVER_TOP_K)
    (root / "generation_config.json").write_text(json.dumps(generation))
    return root


@pytest.fixture(scope="package")
def plain_server(checkpoint_with_top_k, tiny, tmp_path_factory):
    """The same checkpoint and flags without speculation: the target alone."""
    log = tmp_path_factory.mktemp("plain_server") / "server.log"
    args = serve_args(tiny.video_dir, served_model_name=SERVED_NAME)
    with running_server(checkpoint_with_top_k, args, log, env=SERVER_ENV, timeout=START_TIMEOUT_S) as server:
        yield server


@pytest.fixture(scope="package")
def hippo_server(checkpoint_with_top_k, tiny, tmp_path_factory):
    # No "parallel" key: the server runs the schedule users get by default.
    speculative_config = {"method": "hippo", "model": str(tiny.draft), "num_speculative_tokens": K}
    args = serve_args(tiny.video_dir, served_model_name=SERVED_NAME, speculative_config=speculative_config)
    log = tmp_path_factory.mktemp("hippo_server") / "server.log"
    with running_server(checkpoint_with_top_k, args, log, env=SERVER_ENV, timeout=START_TIMEOUT_S) as server:
        yield server
