"""The draft in a worker of its own: RemoteDraft (a process) and RayDraft (a Ray actor).

These drive the real DraftWorker (tiny draft checkpoint) in a real worker
process or actor through the backends, with the target's VllmConfig as vLLM
builds it, and check what the proposer relies on: answers match those of a
DraftWorker called directly, a late answer gives None at its deadline and can
be read later (matched by seq), a worker that stalls
or dies is restarted with ``epoch`` bumped (or stays off after
``max_restarts``), and no worker process outlives its client or its parent.
Engine-level (lossless) tests with these placements are in
test_draft_worker_lossless.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from engine_utils import CPU_DEFAULTS
from hippo_vllm.vllm.protocol import StepResult

pytestmark = pytest.mark.engine

K = 3
PROMPT = list(range(10, 30))


@pytest.fixture(scope="module")
def target_config(tiny):
    from vllm.engine.arg_utils import EngineArgs

    args = {k: v for k, v in CPU_DEFAULTS.items() if k != "disable_log_stats"}
    return EngineArgs(model=str(tiny.target), **args).create_engine_config()


def hippo(tiny, **worker):
    from hippo_vllm.config import HippoConfig

    return HippoConfig(model=str(tiny.draft), num_speculative_tokens=K, draft_worker=worker)


def first_step(seq=1, req_id="a"):
    from hippo_vllm.vllm.protocol import ChunkOrder, DraftPrompt, Prefill, StepWork

    prompt = DraftPrompt(req_id, PROMPT, [], torch.arange(len(PROMPT)).expand(3, -1).clone(), 0)
    return StepWork(seq=seq, prefills=[Prefill(req_id, prompt, None)], chunks=[ChunkOrder(req_id, 0, [5], K)])


def next_step(seq, kept, token, req_id="a"):
    from hippo_vllm.vllm.protocol import ChunkOrder, StepWork

    return StepWork(seq=seq, chunks=[ChunkOrder(req_id, kept, [token], K)])


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pid: int, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not alive(pid)


def _chunks_of_a_plain_draft_worker(target_config, hippo_config) -> list[dict]:
    """In a fresh process with a one-rank vLLM world: a DraftWorker called directly."""
    from hippo_vllm.vllm.placements.bootstrap import start_draft_worker

    worker = start_draft_worker(target_config, hippo_config)
    worker.allocate_kv_cache(32)
    return [worker.handle(first_step()).chunks, worker.handle(next_step(2, 1, 6)).chunks]


@pytest.fixture(scope="module")
def reference(target_config, tiny):
    """The chunks a DraftWorker called directly gives for the steps below, as a future: its
    process starts up while the test starts the worker it compares with (``.result()``)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield pool.submit(_chunks_of_a_plain_draft_worker, target_config, hippo(tiny))


def test_a_worker_process_drafts_like_a_plain_worker_and_survives_its_faults(target_config, tiny, reference):
    from hippo_vllm.vllm.metrics.stats import HippoStats
    from hippo_vllm.vllm.placements.process_client import RemoteDraft

    stats = HippoStats()
    config = hippo(tiny, placement="process", cpu_cores=[1], max_restarts=2, timeout_ms=50)
    draft = RemoteDraft(target_config, config, stats)
    # A step unanswered for longer than stall_after_s counts as a stalled worker.
    draft.stall_after_s = 0.5
    pids = [draft.worker_pid]
    try:
        assert os.sched_getaffinity(pids[0]) == {1}
        # Before the first step: the reference's process competes for the cores only
        # while both start up, never while a step's deadline runs.
        expected = reference.result(timeout=300)
        draft.allocate_kv_cache(32)
        # submit returns before the worker answers: two steps in flight at once.
        first, second = draft.submit(first_step()), draft.submit(next_step(2, 1, 6))
        assert [first.result(30).chunks, second.result(30).chunks] == expected
        assert stats.draft_round_trips == 2 and stats.draft_round_trip_seconds > 0
        # A worker busy past the deadline: the step gets None (no chunks); its
        # answer, matched by seq, can still be read later for its other news.
        draft.stall(0.3)
        late = draft.submit(next_step(3, 2, 7))
        assert late.result(0) is None and stats.draft_dropped_steps == 0  # a look, not a deadline
        assert late.result(0.05) is None
        later = draft.submit(next_step(4, 3, 8)).result(30)
        assert later.seq == 4 and len(later.chunks["a"]) == K
        assert late.result(0).seq == 3
        assert stats.draft_dropped_steps == 1 and stats.draft_round_trips == 3
        assert stats.draft_worker_restarts == 0 and draft.epoch == 0

        os.kill(pids[0], signal.SIGKILL)  # dies mid-generation
        assert draft.submit(next_step(5, 4, 9)).result(30) == StepResult(5)  # no drafts
        assert stats.draft_worker_restarts == 1 and wait_gone(pids[0])
        # While the new worker loads, steps go on without drafts at once.
        assert draft.submit(next_step(6, 5, 10)).result(30) == StepResult(6)
        assert wait_for_epoch(draft, 1) == 1 and draft.is_up
        pids.append(draft.worker_pid)
        # It lost every request: the proposer sends the prompt again.
        assert draft.submit(first_step(seq=7)).result(30).chunks == expected[0]
        draft.stall(30.0)  # hangs
        assert draft.submit(next_step(8, 1, 6)).result(0.1) is None
        time.sleep(0.6)
        assert draft.submit(next_step(9, 2, 7)).result(0.1) is None  # stalled: restart 2 of 2
        assert stats.draft_worker_restarts == 2 and wait_gone(pids[1])
        assert wait_for_epoch(draft, 2) == 2
        pids.append(draft.worker_pid)
        os.kill(pids[2], signal.SIGKILL)
        assert draft.submit(first_step(seq=10)).result(30) == StepResult(10)
        assert not draft.is_up and draft.epoch == 2  # no restarts left: drafting stays off
        assert draft.submit(first_step(seq=11)).result(30) == StepResult(11)
        assert stats.draft_worker_restarts == 2
        assert stats.draft_dropped_steps == 7  # steps 3, 5, 6, 8, 9, 10, 11
    finally:
        draft.close()
    assert all(wait_gone(pid) for pid in pids), "a worker process outlived close()"


def wait_for_epoch(draft, epoch: int, seconds: float = 120.0) -> int:
    deadline = time.monotonic() + seconds
    while draft.epoch < epoch and time.monotonic() < deadline:
        time.sleep(0.2)
    return draft.epoch


def test_the_worker_exits_when_its_parent_is_killed(tmp_path, tiny):
    """A parent killed without closing its client (e.g. an engine process killed) leaves no worker."""
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {os.path.join(os.path.dirname(__file__), os.pardir)!r})
        from engine_utils import CPU_DEFAULTS
        from vllm.engine.arg_utils import EngineArgs
        from hippo_vllm.config import HippoConfig
        from hippo_vllm.vllm.metrics.stats import HippoStats
        from hippo_vllm.vllm.placements.process_client import RemoteDraft
        args = {{k: v for k, v in CPU_DEFAULTS.items() if k != "disable_log_stats"}}
        config = EngineArgs(model={str(tiny.target)!r}, **args).create_engine_config()
        hippo = HippoConfig(model={str(tiny.draft)!r}, draft_worker={{"placement": "process"}})
        draft = RemoteDraft(config, hippo, HippoStats())
        print("draft worker", draft.worker_pid, flush=True)
        time.sleep(600)
    """))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        line = ""
        while not line.startswith("draft worker"):
            line = parent.stdout.readline()
            assert line, "the parent exited before its draft worker started"
        worker_pid = int(line.split()[-1])
        assert alive(worker_pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert wait_gone(worker_pid), "the draft worker outlived its killed parent"
    finally:
        if parent.poll() is None:
            parent.kill()


def test_a_ray_actor_drafts_like_a_plain_worker_and_is_restarted_when_it_dies(target_config, tiny, reference):
    import ray

    from hippo_vllm.vllm.metrics.stats import HippoStats
    from hippo_vllm.vllm.placements.ray_actor import RayDraft

    ray.init(num_cpus=2, include_dashboard=False)
    stats = HippoStats()
    try:
        draft = RayDraft(target_config, hippo(tiny, placement="ray", cpu_cores=[1], max_restarts=1), stats,
                         use_gpu=False)
        expected = reference.result(timeout=300)  # before the first step's deadline runs
        draft.allocate_kv_cache(32)
        first, second = draft.submit(first_step()), draft.submit(next_step(2, 1, 6))
        assert [first.result(30).chunks, second.result(30).chunks] == expected
        draft.stall(1.0)
        assert draft.submit(next_step(3, 2, 7)).result(0.05) is None
        assert draft.submit(next_step(4, 3, 8)).result(30).seq == 4
        assert stats.draft_dropped_steps == 1 and stats.draft_round_trips == 3
        os.kill(draft.worker_pid, signal.SIGKILL)
        assert draft.submit(next_step(5, 4, 9)).result(30) == StepResult(5)
        assert stats.draft_worker_restarts == 1
        assert wait_for_epoch(draft, 1) == 1
        assert draft.submit(first_step(seq=6)).result(30).chunks["a"]
        draft.close()
    finally:
        ray.shutdown()
