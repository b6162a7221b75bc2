"""RayDraft: the draft as a Ray actor (``"placement": "ray"``).

The same :class:`~hippo_vllm.vllm.draft_worker.DraftWorker` as in a worker
process, served by a Ray actor: one GPU on a GPU machine (Ray picks it and sets
its ``CUDA_VISIBLE_DEVICES``), ``len(cpu_cores)`` CPUs (or one) on a CPU
machine. Each step is one ``handle.remote(work)`` call; Ray runs an actor's calls
in order, and puts large arguments (a request's video inputs, sent once) in its
object store. ``PendingStep.result(timeout)`` is a ``ray.wait`` with that
deadline. Late steps, a dead or stalled actor and restarts behave as in
:mod:`hippo_vllm.vllm.remote_draft`.

The engine's process connects to the Ray cluster named by ``RAY_ADDRESS``, or
starts a local one.
"""

from __future__ import annotations

import os
import time
from typing import Any

from hippo_vllm.config import HippoConfig
from hippo_vllm.logs import get_logger
from hippo_vllm.vllm.draft_protocol import StepResult, StepWork
from hippo_vllm.vllm.metrics import HippoStats
from hippo_vllm.vllm.remote_draft import (
    MAX_STEPS_BEHIND,
    MIN_STALL_S,
    DraftWorkerError,
    _NoDrafts,
)

logger = get_logger(__name__)

STARTING, UP, OFF = "starting", "up", "off"


class DraftActor:
    """Runs in the actor's process: a one-rank vLLM world and the draft worker."""

    def __init__(self, vllm_config: Any, hippo: HippoConfig):
        from hippo_vllm.vllm.draft_worker_process import _bind_threads, _build, _init_one_rank_world, _prepare_device

        import torch

        cores = hippo.draft_worker.cpu_cores
        if cores:
            _bind_threads(list(cores))
            torch.set_num_threads(len(cores))
        _prepare_device()  # on a GPU: the one Ray assigned, cuda:0 in this process
        _init_one_rank_world(vllm_config)
        self.worker = _build(vllm_config, hippo)

    def info(self) -> tuple[float, int, int, list[str]]:
        import ray

        gpus = [str(g) for g in ray.get_gpu_ids()]
        return self.worker.kv_bytes_per_token, self.worker.block_size, os.getpid(), gpus

    def allocate_kv_cache(self, num_blocks: int) -> int:
        self.worker.allocate_kv_cache(num_blocks)
        return num_blocks

    def handle(self, work: StepWork) -> StepResult:
        return self.worker.handle(work)

    def stall(self, seconds: float) -> None:
        time.sleep(seconds)


class _RayPending:
    def __init__(self, client: RayDraft, seq: int, ref: Any, generation: int):
        self._client, self.seq, self.ref, self.generation = client, seq, ref, generation
        self.sent_at = time.perf_counter()
        self.late = False  # its first read missed the deadline: its chunks are dropped

    def result(self, timeout: float | None = None) -> StepResult | None:
        return self._client._result(self, timeout)


class RayDraft:
    """A DraftBackend whose draft is a Ray actor."""

    def __init__(
        self,
        vllm_config: Any,
        hippo: HippoConfig,
        stats: HippoStats,
        *,
        use_gpu: bool,
        target_physical_gpus: set[str] = frozenset(),
    ):
        import ray

        self.vllm_config, self.hippo, self.stats = vllm_config, hippo, stats
        self.settings = hippo.draft_worker
        self.use_gpu = use_gpu
        self.target_physical_gpus = set(target_physical_gpus)
        self.stall_after_s = max(MIN_STALL_S, 10 * self.settings.timeout_s)
        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS"), ignore_reinit_error=True, include_dashboard=False)
        self._actor_class = ray.remote(DraftActor)
        self._epoch = 0
        self._generation = 0
        self._restarts = 0
        self._num_blocks: int | None = None
        self._logged: set[str] = set()
        self._actor = None
        self._state = OFF
        self._start_actor()
        try:
            self.kv_bytes_per_token, self.block_size, self.worker_pid, gpus = ray.get(
                self._ready_ref, timeout=self.settings.start_timeout_s
            )
        except Exception as exc:
            self._kill_actor()
            raise DraftWorkerError(f"the draft's Ray actor did not start: {type(exc).__name__}: {exc}") from exc
        self._check_gpus(gpus)
        self._state = UP

    # -- DraftBackend -------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        self._poll_state()
        return self._epoch

    @property
    def is_up(self) -> bool:
        return self._state == UP

    def allocate_kv_cache(self, num_blocks: int) -> None:
        import ray

        self._num_blocks = num_blocks
        ray.get(self._actor.allocate_kv_cache.remote(num_blocks), timeout=self.settings.start_timeout_s)

    def submit(self, work: StepWork):
        self._poll_state()
        if self._state != UP:
            self.stats.draft_dropped_steps += 1
            return _NoDrafts(work.seq)
        self._prune_answered()
        if len(self._outstanding) >= MAX_STEPS_BEHIND:
            self._lost("fell behind", f"{len(self._outstanding)} steps unanswered")
            return _NoDrafts(work.seq)
        pending = _RayPending(self, work.seq, self._actor.handle.remote(work), self._generation)
        self._outstanding[work.seq] = (pending.sent_at, pending.ref)
        return pending

    def close(self) -> None:
        self._kill_actor()
        self._state = OFF

    def stall(self, seconds: float) -> None:
        """Make the actor sleep ``seconds`` before its next call (tests of the deadlines)."""
        self._actor.stall.remote(seconds)

    # -- results ------------------------------------------------------------------------

    def _result(self, pending: _RayPending, timeout: float | None) -> StepResult | None:
        """As RemoteDraft's: None while not back; a late result can still be read later."""
        import ray

        if timeout is None:
            timeout = self.settings.timeout_s
        start = time.perf_counter()
        try:
            if pending.generation == self._generation and self._state == UP:
                ready, _ = ray.wait([pending.ref], timeout=timeout)
                if not ready:
                    if not pending.late:
                        self._late(pending, timeout)
                    return None
                self._outstanding.pop(pending.seq, None)
                try:
                    result = ray.get(pending.ref)
                except Exception as exc:  # noqa: BLE001 - a dead actor (RayActorError) and the like
                    self._dropped(pending)
                    self._lost("died", f"{type(exc).__name__}: {exc}")
                    return StepResult(pending.seq)
                if not pending.late:
                    self.stats.draft_round_trip_seconds += time.perf_counter() - pending.sent_at
                    self.stats.draft_round_trips += 1
                return result
            self._dropped(pending)  # the actor that had this step is gone
            return StepResult(pending.seq)
        finally:
            self.stats.draft_wait_seconds += time.perf_counter() - start

    def _dropped(self, pending: _RayPending) -> None:
        if not pending.late:
            pending.late = True
            self.stats.draft_dropped_steps += 1

    def _late(self, pending: _RayPending, timeout: float) -> None:
        self._dropped(pending)
        self._log_once(
            "late", "hippo: the draft actor's answer for a step came after the %.0f ms deadline; "
            "that step goes on without drafts (counted in vllm:hippo_draft_dropped_steps_total)",
            1000 * timeout,
        )
        self._prune_answered()
        oldest = min((sent for sent, _ in self._outstanding.values()), default=None)
        if oldest is not None and time.perf_counter() - oldest > self.stall_after_s:
            self._lost("stalled", f"no answer for {self.stall_after_s:.1f} s")

    def _prune_answered(self) -> None:
        """Forget steps whose (late) answers are in: they no longer count as behind."""
        import ray

        if not self._outstanding:
            return
        refs = [ref for _, ref in self._outstanding.values()]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        done = set(done)
        self._outstanding = {s: v for s, v in self._outstanding.items() if v[1] not in done}

    # -- the actor's life ---------------------------------------------------------------

    def _start_actor(self) -> None:
        cores = self.settings.cpu_cores
        options = {"num_gpus": 1, "num_cpus": 1} if self.use_gpu else {"num_cpus": len(cores) if cores else 1}
        self._generation += 1
        self._outstanding: dict[int, tuple[float, Any]] = {}
        self._actor = self._actor_class.options(**options).remote(self.vllm_config, self.hippo)
        self._ready_ref = self._actor.info.remote()
        self._alloc_ref = None
        self._started_at = time.perf_counter()
        self._state = STARTING

    def _check_gpus(self, gpus: list[str]) -> None:
        shared = sorted(set(gpus) & self.target_physical_gpus)
        if shared:
            self._kill_actor()
            raise DraftWorkerError(
                f"Ray placed the draft on GPU {shared}, which the target uses; make only spare GPUs "
                'available to Ray, or use "placement": "process" with "device": "cuda:N"'
            )

    def _poll_state(self) -> None:
        import ray

        if self._state != STARTING:
            return
        try:
            if self._alloc_ref is None:
                if ray.wait([self._ready_ref], timeout=0)[0]:
                    _, _, self.worker_pid, gpus = ray.get(self._ready_ref)
                    self._check_gpus(gpus)
                    self._alloc_ref = self._actor.allocate_kv_cache.remote(self._num_blocks)
            elif ray.wait([self._alloc_ref], timeout=0)[0]:
                ray.get(self._alloc_ref)
                self._state = UP
                self._epoch += 1
                logger.warning(
                    "hippo: the draft actor is back (restart %d of %d); drafting resumes",
                    self._restarts, self.settings.max_restarts,
                )
                return
        except Exception as exc:  # noqa: BLE001 - the new actor failed to start
            self._lost("failed to start", f"{type(exc).__name__}: {exc}")
            return
        if time.perf_counter() - self._started_at > self.settings.start_timeout_s:
            self._lost("did not start", f"not ready after {self.settings.start_timeout_s:.0f} s")

    def _lost(self, what: str, detail: str) -> None:
        self._kill_actor()
        if self._restarts >= self.settings.max_restarts:
            self._state = OFF
            logger.error(
                "hippo: the draft actor %s (%s) and was restarted %d times "
                '(speculative_config["draft_worker"]["max_restarts"]); drafting stays off for this '
                "engine (outputs are unaffected)", what, detail, self._restarts,
            )
            return
        self._restarts += 1
        self.stats.draft_worker_restarts += 1
        self._log_once(
            f"lost {what}", "hippo: the draft actor %s (%s); restarting it (%d of at most %d); "
            "steps go on without drafts meanwhile", what, detail, self._restarts, self.settings.max_restarts,
        )
        self._start_actor()

    def _kill_actor(self) -> None:
        import ray

        if self._actor is not None:
            try:
                ray.kill(self._actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
            self._actor = None
        self._state = OFF

    def _log_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._logged:
            self._logged.add(key)
            logger.warning(message, *args)
