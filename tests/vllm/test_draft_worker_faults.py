"""The faults of a draft worker of its own that the README promises to survive, one by one.

Real worker processes and Ray actors with the tiny draft, driven through their
backends (RemoteDraft, RayDraft) as the proposer drives them: a worker that
falls 16 steps behind, that exits right after its hello (at start and on a
restart, where a send without a deadline would hang the engine's step), that
never gets ready (the start timeout), whose draft fails to load, that gets a
message it cannot read, and a Ray actor placed on a GPU the target uses. Also
what the counters say: a rare fault is restarted however many restarts came
before it (the budget is per window), and round trips are timed only within a
step, never across idle time. Engine-level fault tests (lossless, TP 2,
`vllm serve`) are in test_draft_worker_lossless.py and tests/server.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from test_draft_worker_backends import first_step, hippo, next_step, target_config, wait_for_epoch  # noqa: F401
from hippo_vllm.vllm.protocol import StepResult

pytestmark = pytest.mark.engine

FAULTY_WORKER = Path(__file__).with_name("faulty_draft_worker.py")
HANG_GUARD_S = 120  # a call that has not returned by then hangs: the test fails instead


def bounded(call, *args):
    """``call(*args)`` on a thread; the test fails if it does not return within HANG_GUARD_S."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(call, *args).result(timeout=HANG_GUARD_S)


def remote_draft(config, hippo_config, faults_from_generation: int | None = None, fault: str = ""):
    """A RemoteDraft whose workers from generation ``faults_from_generation`` on are faulty."""
    from hippo_vllm.vllm.metrics.stats import HippoStats
    from hippo_vllm.vllm.placements.process_client import RemoteDraft

    class Faulty(RemoteDraft):
        def _worker_command(self):
            if faults_from_generation is not None and self._generation >= faults_from_generation:
                return [sys.executable, str(FAULTY_WORKER), fault]
            return super()._worker_command()

    return Faulty(config, hippo_config, HippoStats())


def test_a_worker_that_exits_after_its_hello_fails_the_start_and_never_hangs_a_restart(target_config, tiny):
    from hippo_vllm.vllm.placements.supervised import OFF, DraftWorkerError

    settings = hippo(tiny, placement="process", cpu_cores=[1], timeout_ms=100)
    with pytest.raises(DraftWorkerError, match="draft worker"):
        bounded(remote_draft, target_config, settings, 1, "exit_after_hello")

    # Restarts run inside the engine's step: every submit returns at once while the
    # faulty workers come and go, until the crash loop uses up the budget.
    settings = hippo(tiny, placement="process", cpu_cores=[1], timeout_ms=100, max_restarts=2)
    draft = remote_draft(target_config, settings, 2, "exit_after_hello")
    try:
        draft.allocate_kv_cache(32)
        assert bounded(draft.submit(first_step()).result, 30).chunks["a"]
        os.kill(draft.worker_pid, signal.SIGKILL)
        seq, deadline = 2, time.monotonic() + HANG_GUARD_S
        while draft.stats.draft_worker_restarts < 2 or draft._state != OFF:
            assert bounded(draft.submit(next_step(seq, 1, 6)).result, 1) == StepResult(seq)
            seq += 1
            assert time.monotonic() < deadline, "the faulty workers never used up the restart budget"
            time.sleep(0.05)
        assert not draft.is_up and draft.epoch == 0
        assert draft.stats.draft_worker_down_seconds > 0
    finally:
        draft.close()


def test_the_start_timeout_and_a_draft_that_fails_to_load_are_clear_errors(target_config, tiny, tmp_path):
    from hippo_vllm.vllm.placements.supervised import DraftWorkerError

    silent = hippo(tiny, placement="process", start_timeout_s=2)
    with pytest.raises(DraftWorkerError, match=r"not ready after 2 s.*start_timeout_s"):
        bounded(remote_draft, target_config, silent, 1, "silent_after_hello")

    from hippo_vllm.config import HippoConfig

    (tmp_path / "config.json").write_text("{}")  # a checkpoint the draft cannot load
    broken = HippoConfig(model=str(tmp_path), num_speculative_tokens=3, draft_worker={"placement": "process"})
    with pytest.raises(DraftWorkerError, match="failed in draft worker start"):
        bounded(remote_draft, target_config, broken)


def test_falling_16_steps_behind_restarts_and_a_rare_fault_is_always_restarted(target_config, tiny):
    # One restart per 1 s window, and each restart takes longer than that: every
    # fault below is rare by the budget's measure, so drafting always comes back.
    settings = hippo(tiny, placement="process", cpu_cores=[1], timeout_ms=50, max_restarts=1,
                     restart_window_s=1.0)
    draft = remote_draft(target_config, settings)
    stats = draft.stats
    try:
        draft.allocate_kv_cache(32)
        assert draft.submit(first_step()).result(30).chunks["a"]
        draft.stall(60.0)  # busy: every step below is late and stays unanswered
        for seq in range(2, 18):
            assert draft.submit(next_step(seq, 1, 6)).result(0.01) is None
        assert stats.draft_worker_restarts == 0
        assert draft.submit(next_step(18, 1, 6)).result(1) == StepResult(18)  # the 17th: fell behind
        assert stats.draft_worker_restarts == 1
        assert wait_for_epoch(draft, 1) == 1
        assert draft.submit(first_step(seq=19)).result(30).chunks["a"]
        down_after_one = stats.draft_worker_down_seconds
        assert down_after_one > 0

        os.kill(draft.worker_pid, signal.SIGKILL)  # the second fault: restarted too
        assert draft.submit(next_step(20, 1, 6)).result(30) == StepResult(20)
        assert stats.draft_worker_restarts == 2
        assert wait_for_epoch(draft, 2) == 2 and draft.is_up
        assert draft.submit(first_step(seq=21)).result(30).chunks["a"]
        assert stats.draft_worker_down_seconds > down_after_one
    finally:
        draft.close()


def test_round_trips_are_timed_within_a_step_and_malformed_messages_cost_one_step(target_config, tiny):
    from hippo_vllm.vllm.placements.supervised import SupervisedPending
    from hippo_vllm.vllm.placements.wire import HEADER

    draft = remote_draft(target_config, hippo(tiny, placement="process", cpu_cores=[1]))
    stats = draft.stats
    try:
        draft.allocate_kv_cache(32)
        assert draft.submit(first_step()).result(30).chunks["a"]
        assert stats.draft_round_trips == 1
        # A step whose answer is first read after an idle gap (vLLM ran it without
        # reading its drafts; the proposer takes it in later, without waiting).
        idle = draft.submit(next_step(2, 1, 6))
        time.sleep(1.0)
        assert idle.result(0).seq == 2
        assert stats.draft_round_trips == 1, "an answer read after idle time counted as a round trip"
        in_step = draft.submit(next_step(3, 2, 7))
        assert in_step.result(30).seq == 3
        assert stats.draft_round_trips == 2

        # Messages the worker cannot read: a step's work (that step fails on the
        # draft's side) and one of an unknown kind; the worker goes on either way.
        socket = draft._channel.socket
        socket.send_multipart([HEADER.encode(("work", 4)), b"\xc1 not msgpack"])
        broken = SupervisedPending(draft, 4, draft._generation).result(30)
        assert broken.seq == 4 and not broken.chunks
        assert "reading a message" in broken.step_failure.where
        socket.send_multipart([b"\xc1", b""])
        assert draft.submit(next_step(5, 3, 8)).result(30).chunks["a"]
        assert draft.is_up and stats.draft_worker_restarts == 0
    finally:
        draft.close()


def test_ray_started_by_hippo_sees_only_spare_gpus_refuses_a_target_gpu_and_gives_up_fast(target_config, tiny):
    import ray

    from hippo_vllm.vllm.metrics.stats import HippoStats
    from hippo_vllm.vllm.placements.ray_actor import RayDraft, start_ray
    from hippo_vllm.vllm.placements.supervised import DraftWorkerError

    with pytest.raises(DraftWorkerError, match="no spare GPU for the draft's Ray actor"):
        start_ray(use_gpu=True, spare_gpus=set())
    # A machine whose GPUs 5 and 7 are spare (the target holds the others): the local
    # Ray hippo starts knows only those, so the actor lands on one of them.
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    start_ray(use_gpu=True, spare_gpus={"5", "7"})
    try:
        assert os.environ.get("CUDA_VISIBLE_DEVICES") == visible  # restored for the engine
        draft = RayDraft(target_config, hippo(tiny, placement="ray"), HippoStats(), use_gpu=True,
                         target_physical_gpus={"0", "1", "2", "3"})
        _, gpus, _ = ray.get(draft._placed_ref)
        assert gpus in (["5"], ["7"])
        draft.close()
        # Ray placing the actor on a GPU the target uses on this node is refused.
        with pytest.raises(DraftWorkerError, match=r"GPU \['[57]'\], which the target uses on this node"):
            RayDraft(target_config, hippo(tiny, placement="ray"), HippoStats(), use_gpu=True,
                     target_physical_gpus={"5", "7"})
    finally:
        ray.shutdown()
    # No GPU free for the actor at all (vLLM's Ray executor holding them): a clear error,
    # after the placement wait rather than the whole start_timeout_s.
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False)
    try:
        with pytest.raises(DraftWorkerError, match=r"Ray did not place the draft's actor within 5 s: no node has a GPU"):
            bounded(lambda: RayDraft(target_config, hippo(tiny, placement="ray", start_timeout_s=5), HippoStats(),
                                     use_gpu=True, target_physical_gpus={"0"}))
    finally:
        ray.shutdown()


def test_a_target_gpu_id_on_another_node_is_not_the_targets():
    import types

    from hippo_vllm.vllm.placements.ray_actor import RayDraft
    from hippo_vllm.vllm.placements.supervised import DraftWorkerError

    draft = types.SimpleNamespace(target_node="node-a", target_physical_gpus={"0", "1"})
    RayDraft._check_gpus(draft, "node-b", ["0"])  # GPU 0 of another node is free for the draft
    with pytest.raises(DraftWorkerError, match=r"GPU \['1'\]"):
        RayDraft._check_gpus(draft, "node-a", ["1"])


def test_a_target_with_data_parallelism_gives_the_worker_a_one_rank_world(tiny):
    """Under the target's DP-2 config vLLM would make the worker rank 0 of a 2-rank world
    and rendezvous at the target's DP master: it would never start."""
    from vllm.engine.arg_utils import EngineArgs

    from engine_utils import CPU_DEFAULTS
    from hippo_vllm.vllm.placements.bootstrap import one_rank_config

    args = {k: v for k, v in CPU_DEFAULTS.items() if k != "disable_log_stats"}
    dp2 = EngineArgs(model=str(tiny.target), data_parallel_size=2, **args).create_engine_config()
    assert dp2.parallel_config.world_size_across_dp == 2
    one_rank = one_rank_config(dp2).parallel_config
    assert (one_rank.data_parallel_size, one_rank.nnodes, one_rank.world_size) == (1, 1, 1)
    assert dp2.parallel_config.data_parallel_size == 2  # the target's config is untouched

    draft = bounded(remote_draft, dp2, hippo(tiny, placement="process", cpu_cores=[1], start_timeout_s=90))
    try:
        assert draft.allocate_kv_cache(32) == 32  # the blocks allocated (capped only on a GPU)
        assert draft.submit(first_step()).result(30).chunks["a"]
    finally:
        draft.close()
