"""RayDraft: the draft as a Ray actor (``"placement": "ray"``).

The same :class:`~hippo_vllm.vllm.draft.worker.DraftWorker` as in a worker
process, served by a Ray actor: one GPU on a GPU machine (Ray picks it and sets
its ``CUDA_VISIBLE_DEVICES``), ``len(cpu_cores)`` CPUs (or one) on a CPU
machine. Each step is one ``handle.remote(work)`` call; Ray runs an actor's calls
in order, and puts large arguments (a request's video inputs, sent once) in its
object store; tensors travel on the CPU only (the target's s_attn is moved there
first), so an actor on another GPU or node can read them. ``PendingStep.result(timeout)`` is a ``ray.wait`` with that
deadline. Late steps, a dead or stalled actor and restarts are supervised as a
worker process's are (:mod:`hippo_vllm.vllm.placements.supervised`).

The engine's process connects to the Ray cluster named by ``RAY_ADDRESS``, or
starts a local one. A local Ray started here sees only the GPUs the target does
not use (vLLM does not narrow ``CUDA_VISIBLE_DEVICES`` per rank, so Ray would
otherwise hand the actor GPU 0, the target's). Wherever Ray places the actor, a
(node, GPU) pair of the target's is refused, and an actor Ray cannot place (no
free GPU: vLLM's Ray executor may hold them all) is given up after
``SCHEDULE_TIMEOUT_S`` with a message, not after the whole ``start_timeout_s``.
"""

from __future__ import annotations

import os
import time
from typing import Any

from hippo_vllm.config import HippoConfig
from hippo_vllm.logs import get_logger
from hippo_vllm.vllm.protocol import StepResult, StepWork, result_on_host, work_on_host
from hippo_vllm.vllm.metrics.stats import HippoStats
from hippo_vllm.vllm.placements.supervised import (
    MAX_STEPS_BEHIND,
    OFF,
    UP,
    DraftWorkerError,
    NoDrafts,
    SupervisedDraft,
    SupervisedPending,
)


logger = get_logger(__name__)

SCHEDULE_TIMEOUT_S = 60.0  # for Ray to place the actor (its process up), before the draft loads


class DraftActor:
    """Runs in the actor's process: a one-rank vLLM world and the draft worker.

    Built light (threads bound), so ``placed`` answers as soon as Ray has placed
    it; ``load`` then loads the draft.
    """

    def __init__(self, cpu_cores: tuple[int, ...] | None):
        from hippo_vllm.vllm.placements.bootstrap import bind_threads

        if cpu_cores:
            bind_threads(list(cpu_cores))
        self.worker = None

    def placed(self) -> tuple[str, list[str], int]:
        """Where Ray placed this actor: its node id, its GPU ids, its pid."""
        import ray

        return ray.get_runtime_context().get_node_id(), [str(g) for g in ray.get_gpu_ids()], os.getpid()

    def load(self, vllm_config: Any, hippo: HippoConfig) -> tuple[float, int]:
        from hippo_vllm.vllm.placements.bootstrap import start_draft_worker

        # On a GPU: the one Ray assigned, cuda:0 in this process.
        self.worker = start_draft_worker(vllm_config, hippo)
        return self.worker.kv_bytes_per_token, self.worker.block_size

    def allocate_kv_cache(self, num_blocks: int) -> int:
        from hippo_vllm.vllm.placements.bootstrap import allocate_kv_cache_within_device

        return allocate_kv_cache_within_device(self.worker, num_blocks)

    def handle(self, work: StepWork) -> StepResult:
        return result_on_host(self.worker.handle(work))  # its kept rows may be on the draft's GPU

    def stall(self, seconds: float) -> None:
        time.sleep(seconds)


class RayDraft(SupervisedDraft):
    """A DraftBackend whose draft is a Ray actor."""

    noun = "draft actor"

    def __init__(
        self,
        vllm_config: Any,
        hippo: HippoConfig,
        stats: HippoStats,
        *,
        use_gpu: bool,
        target_physical_gpus: set[str] = frozenset(),
        spare_physical_gpus: set[str] = frozenset(),
    ):
        import ray

        super().__init__(hippo, stats)
        self.vllm_config = vllm_config
        self.use_gpu = use_gpu
        self.target_physical_gpus = set(target_physical_gpus)
        if not ray.is_initialized():
            start_ray(use_gpu, set(spare_physical_gpus))
        # The target's GPUs are this node's: the engine's process runs here.
        self.target_node = ray.get_runtime_context().get_node_id()
        self._actor_class = ray.remote(DraftActor)
        self._actor = None
        self._restart()
        try:
            self._wait_placed(min(SCHEDULE_TIMEOUT_S, self.settings.start_timeout_s))
            self.kv_bytes_per_token, self.block_size = ray.get(self._ready_ref, timeout=self.settings.start_timeout_s)
        except DraftWorkerError:
            self._stop(graceful=False)
            raise
        except Exception as exc:
            self._stop(graceful=False)
            raise DraftWorkerError(f"the draft's Ray actor did not start: {type(exc).__name__}: {exc}") from exc
        self._state = UP

    # -- DraftBackend -------------------------------------------------------------------

    def allocate_kv_cache(self, num_blocks: int) -> int:
        import ray

        self._num_blocks = num_blocks
        return ray.get(self._actor.allocate_kv_cache.remote(num_blocks), timeout=self.settings.start_timeout_s)

    def submit(self, work: StepWork):
        if not self._ready_to_submit(work.seq):
            return NoDrafts(work.seq)
        self._prune_answered()
        if len(self._outstanding) >= MAX_STEPS_BEHIND:
            self._lost("fell behind", f"{len(self._outstanding)} steps unanswered")
            return NoDrafts(work.seq)
        pending = SupervisedPending(self, work.seq, self._generation, ref=self._actor.handle.remote(work_on_host(work)))
        self._outstanding[work.seq] = (pending.sent_at, pending.ref)
        return pending

    def close(self) -> None:
        self._stop(graceful=True)

    def stall(self, seconds: float) -> None:
        """Make the actor sleep ``seconds`` before its next call (tests of the deadlines)."""
        self._actor.stall.remote(seconds)

    # -- results ------------------------------------------------------------------------

    def _result(self, pending: SupervisedPending, timeout: float | None) -> StepResult | None:
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
                self._answered(pending, time.perf_counter(), timeout)
                return result
            self._dropped(pending)  # the actor that had this step is gone
            return StepResult(pending.seq)
        finally:
            self.stats.draft_wait_seconds += time.perf_counter() - start

    def _oldest_unanswered(self) -> float | None:
        self._prune_answered()
        return min((sent for sent, _ in self._outstanding.values()), default=None)

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

    def _start(self) -> None:
        cores = self.settings.cpu_cores
        options = {"num_gpus": 1, "num_cpus": 1} if self.use_gpu else {"num_cpus": len(cores) if cores else 1}
        self._outstanding: dict[int, tuple[float, Any]] = {}
        self._actor = self._actor_class.options(**options).remote(cores)
        self._placed_ref = self._actor.placed.remote()
        self._ready_ref = self._actor.load.remote(self.vllm_config, self.hippo)
        self._alloc_ref = None

    def _wait_placed(self, timeout_s: float) -> None:
        """Wait for Ray to place the actor; refuse a GPU of the target's."""
        import ray

        if not ray.wait([self._placed_ref], timeout=timeout_s)[0]:
            wanted = "a GPU" if self.use_gpu else f"{len(self.settings.cpu_cores or (0,))} CPU(s)"
            raise DraftWorkerError(
                f"Ray did not place the draft's actor within {timeout_s:.0f} s: no node has {wanted} free "
                f"(available: {ray.available_resources()}). vLLM's Ray executor or other actors may "
                'hold them; make a spare GPU available to Ray, or use "placement": "process"'
            )
        node, gpus, self.worker_pid = ray.get(self._placed_ref)
        self._check_gpus(node, gpus)

    def _check_gpus(self, node: str, gpus: list[str]) -> None:
        shared = sorted(set(gpus) & self.target_physical_gpus) if node == self.target_node else []
        if shared:
            raise DraftWorkerError(
                f"Ray placed the draft on GPU {shared}, which the target uses on this node; make only spare "
                'GPUs available to Ray, or use "placement": "process" with "device": "cuda:N"'
            )

    def _advance_start(self) -> None:
        import ray

        try:
            if self._alloc_ref is None:
                if ray.wait([self._ready_ref], timeout=0)[0]:
                    ray.get(self._ready_ref)
                    self._wait_placed(0)  # placed before it loaded
                    self._alloc_ref = self._actor.allocate_kv_cache.remote(self._num_blocks)
            elif ray.wait([self._alloc_ref], timeout=0)[0]:
                ray.get(self._alloc_ref)
                self._back_up("")
                return
        except Exception as exc:  # noqa: BLE001 - the new actor failed to start
            self._lost("failed to start", f"{type(exc).__name__}: {exc}")
            return
        self._start_timed_out()

    def _stop(self, graceful: bool) -> None:
        """Kill the actor (graceful or not: an actor has nothing to flush)."""
        import ray

        if self._actor is not None:
            try:
                ray.kill(self._actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
            self._actor = None
        self._state = OFF


def start_ray(use_gpu: bool, spare_gpus: set[str]) -> None:
    """Join the cluster in ``RAY_ADDRESS``, or start a local Ray that sees only ``spare_gpus``.

    Ray's raylet takes its GPU ids from CUDA_VISIBLE_DEVICES when it starts, and
    hands each GPU actor one of them.
    """
    import ray

    address = os.environ.get("RAY_ADDRESS")
    if address or not use_gpu:
        ray.init(address=address, ignore_reinit_error=True, include_dashboard=False)
        return
    if not spare_gpus:
        raise DraftWorkerError(
            "no spare GPU for the draft's Ray actor: the target uses every GPU this engine sees; "
            "free one, or point RAY_ADDRESS at a cluster with a GPU for the draft"
        )
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(sorted(spare_gpus))
    try:
        ray.init(num_gpus=len(spare_gpus), ignore_reinit_error=True, include_dashboard=False)
    finally:
        if visible is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = visible
    logger.info("hippo: started a local Ray with the spare GPUs %s for the draft's actor", sorted(spare_gpus))
