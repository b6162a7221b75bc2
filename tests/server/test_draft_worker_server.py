"""A draft worker killed under `vllm serve`, with vLLM's multiprocess engine, as users run it.

The hippo server here runs the draft in a worker process of its own (in the default
draft-then-verify schedule, and in VPSD with the adaptive draft length) and the engine
core in its own process (vLLM's default; the other server tests keep the worker in
the engine-core process to start faster). The worker is killed with SIGKILL while
requests come; every answer stays token-identical to the plain server's, the
worker comes back by itself (the log says so once), drafting resumes, and
`/metrics` counts the restart and the time drafting was off.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from engine_utils import serve_args  # noqa: E402
from server_process import metric_totals, read_metrics, running_server  # noqa: E402
from shared_servers import K, SERVED_NAME, START_TIMEOUT_S  # noqa: E402
from test_openai_server import ask_concurrently, drafted_since, drafted_tokens, video_chat  # noqa: E402

pytestmark = pytest.mark.engine

WORKER_MODULE = "hippo_vllm.vllm.placements.process_worker"
BACK_WITHIN_S = 180


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid``."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def draft_worker_pid(server_pid: int) -> int:
    for pid in descendants(server_pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if WORKER_MODULE.encode() in f.read():
                    return pid
        except OSError:
            continue
    raise AssertionError("no draft worker process under the server")


def token_ids(answers) -> list:
    for answer in answers:
        if isinstance(answer, BaseException):
            raise answer
    return [a.token_ids for a in answers]


# The default schedule, and VPSD with PEARL's adaptive draft length (at most 6 tokens a round).
SCHEDULES = {"draft-then-verify": {"num_speculative_tokens": K},
             "vpsd-adaptive": {"num_speculative_tokens": 6, "parallel": True, "draft_length": "adaptive"}}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_a_killed_draft_worker_comes_back_and_no_answer_changes(schedule, plain_server, checkpoint_with_top_k,
                                                                 tiny, tmp_path_factory):
    videos = tiny.synthetic_videos
    chats = [video_chat(videos[0].as_uri()), video_chat(videos[1].as_uri(), "What moves?"),
             [{"role": "user", "content": "Which colours appear?"}]]
    expected = token_ids(ask_concurrently(plain_server, chats))
    speculative_config = {"method": "hippo", "model": str(tiny.draft), **SCHEDULES[schedule],
                          "draft_worker": {"placement": "process", "cpu_cores": [1]}}
    args = serve_args(tiny.video_dir, served_model_name=SERVED_NAME, speculative_config=speculative_config)
    log = tmp_path_factory.mktemp("draft_worker_server") / "server.log"
    multiprocess = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    with running_server(checkpoint_with_top_k, args, log, env=multiprocess, timeout=START_TIMEOUT_S) as server:
        drafted = drafted_tokens(server)
        assert token_ids(ask_concurrently(server, chats)) == expected
        assert drafted_since(server, drafted)
        first = draft_worker_pid(server.process.pid)
        os.kill(first, signal.SIGKILL)

        # Requests keep coming while the worker restarts; none of them notices.
        deadline = time.monotonic() + BACK_WITHIN_S
        while "draft worker is back" not in server.log_tail(400):
            assert token_ids(ask_concurrently(server, chats)) == expected
            assert time.monotonic() < deadline, server.log_tail()
        assert server.log_tail(400).count("draft worker is back") == 1

        drafted = drafted_tokens(server)
        assert token_ids(ask_concurrently(server, chats)) == expected
        assert drafted_since(server, drafted), "drafting did not resume"
        assert draft_worker_pid(server.process.pid) != first
        totals = metric_totals(read_metrics(server.base_url))
        assert totals["vllm:hippo_draft_worker_restarts_total"] == 1
        assert totals["vllm:hippo_draft_worker_down_seconds_total"] > 0
        assert server.is_healthy()
