"""RemoteDraft: the draft in a worker process of its own (``"placement": "process"``).

The client side of :mod:`hippo_vllm.vllm.draft_worker_process`, in the target's
output-rank worker. ``submit`` sends a StepWork and returns at once, so the
worker drafts while the target runs its forward; ``PendingStep.result(timeout)``
waits at most ``timeout`` seconds for that step's StepResult. A step whose
result is not back in time goes on without chunks (None); the result, matched by
its ``seq`` when it arrives, can still be read later for its other news (views,
failures, lack of room). The worker keeps applying every StepWork in order, so a
late step costs only its chunks.

Faults never reach the target: a worker that dies, stalls (no answer for
``stall_after_s``) or falls ``MAX_STEPS_BEHIND`` steps behind is killed and
restarted in the background, at most ``max_restarts`` times; meanwhile steps get
no drafts. A restarted worker has lost every request, so ``epoch`` goes up when
it is ready and the proposer sends its prompts again. After the last restart
drafting stays off, with one error in the log. Each kind of fault is logged once;
the counts are in the hippo metrics.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import weakref
from collections.abc import Mapping
from typing import Any

import zmq

import hippo_vllm
from hippo_vllm.config import HippoConfig
from hippo_vllm.logs import get_logger
from hippo_vllm.vllm.draft_protocol import StepResult, StepWork
from hippo_vllm.vllm.draft_wire import Messenger
from hippo_vllm.vllm.metrics import HippoStats

logger = get_logger(__name__)

MAX_STEPS_BEHIND = 16  # unanswered steps before the worker counts as fallen behind
MAX_RESULTS_KEPT = 4 * MAX_STEPS_BEHIND  # answers received and not yet read
MIN_STALL_S = 5.0  # a worker silent this long (and 10 deadlines) with work queued is stalled
SHUTDOWN_GRACE_S = 5.0
DEATH_CHECK_S = 0.05  # while waiting for an answer, whether the worker still lives

STARTING, UP, OFF = "starting", "up", "off"


def _kill_quietly(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


class DraftWorkerError(RuntimeError):
    """The draft worker could not be started."""


class _NoDrafts:
    """A step no worker will answer (none is up, or the one that had it is gone):
    an empty result, at once, so the proposer's step goes on without drafts."""

    def __init__(self, seq: int):
        self.seq = seq

    def result(self, timeout: float | None = None) -> StepResult:
        return StepResult(self.seq)


class _Pending:
    def __init__(self, client: RemoteDraft, seq: int, generation: int):
        self._client, self.seq, self.generation = client, seq, generation
        self.sent_at = time.perf_counter()
        self.late = False  # its first read missed the deadline: its chunks are dropped

    def result(self, timeout: float | None = None) -> StepResult | None:
        return self._client._result(self, timeout)


class RemoteDraft:
    """A DraftBackend whose draft runs in a worker process of its own."""

    def __init__(
        self,
        vllm_config: Any,
        hippo: HippoConfig,
        stats: HippoStats,
        *,
        env: Mapping[str, str] | None = None,
    ):
        self.vllm_config = vllm_config
        self.hippo = hippo
        self.settings = hippo.draft_worker
        self.stats = stats
        self.extra_env = dict(env or {})
        self.stall_after_s = max(MIN_STALL_S, 10 * self.settings.timeout_s)
        self._ctx = zmq.Context()
        self._epoch = 0
        self._generation = 0
        self._restarts = 0
        self._num_blocks: int | None = None
        self._logged: set[str] = set()
        self._proc: subprocess.Popen | None = None
        self._channel: Messenger | None = None
        self._state = OFF
        self._start_worker()
        ready = self._wait_for("ready", self.settings.start_timeout_s)
        self.kv_bytes_per_token, self.block_size = ready
        self._state = UP

    # -- DraftBackend -------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        self._poll_state()
        return self._epoch

    @property
    def worker_pid(self) -> int | None:
        """The live worker's process id (None while none is started)."""
        return None if self._proc is None else self._proc.pid

    @property
    def is_up(self) -> bool:
        return self._state == UP

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self._num_blocks = num_blocks
        self._channel.send("alloc", num_blocks)
        self._wait_for("allocated", self.settings.start_timeout_s)

    def submit(self, work: StepWork):
        self._poll_state()
        if self._state != UP:
            self.stats.draft_dropped_steps += 1
            return _NoDrafts(work.seq)
        if self._proc.poll() is not None:
            self.stats.draft_dropped_steps += 1
            self._lost("died", f"exit code {self._proc.returncode}")
            return _NoDrafts(work.seq)
        if len(self._sent) >= MAX_STEPS_BEHIND:
            self._lost("fell behind", f"{len(self._sent)} steps unanswered")
            return _NoDrafts(work.seq)
        try:
            self._channel.send("work", work, block=False)
        except zmq.Again:
            self._lost("fell behind", "its message queue is full")
            return _NoDrafts(work.seq)
        pending = _Pending(self, work.seq, self._generation)
        self._sent[work.seq] = pending.sent_at
        return pending

    def close(self) -> None:
        """Stop the worker (it also exits by itself when this process dies)."""
        self._stop_worker(graceful=True)
        self._state = OFF
        self._ctx.term()

    def stall(self, seconds: float) -> None:
        """Make the worker sleep ``seconds`` before its next message (tests of the deadlines)."""
        self._channel.send("stall", seconds)

    # -- results ------------------------------------------------------------------------

    def _result(self, pending: _Pending, timeout: float | None) -> StepResult | None:
        """The step's result; None while it is not back. A late step's result can still be
        read later (its views, failures and lack of room matter; its chunks are stale)."""
        if timeout is None:
            timeout = self.settings.timeout_s  # a remote worker is never waited for unboundedly
        start = time.perf_counter()
        try:
            deadline = start + timeout
            while pending.generation == self._generation and self._state == UP:
                arrived = self._results.pop(pending.seq, None)
                if arrived is not None:
                    result, arrived_at = arrived
                    if not pending.late:
                        self.stats.draft_round_trip_seconds += arrived_at - pending.sent_at
                        self.stats.draft_round_trips += 1
                    return result
                if self._proc.poll() is not None:
                    self._dropped(pending)
                    self._lost("died", f"exit code {self._proc.returncode}")
                    break
                remaining = deadline - time.perf_counter()
                # In slices, so a worker that dies meanwhile is noticed before the deadline.
                if not self._channel.poll(max(0.0, min(remaining, DEATH_CHECK_S))):
                    if remaining > DEATH_CHECK_S:
                        continue
                    if not pending.late:
                        self._late(pending, timeout)
                    return None
                self._receive_one()
            # The worker that had this step is gone: it will never be answered.
            self._dropped(pending)
            return StepResult(pending.seq)
        finally:
            self.stats.draft_wait_seconds += time.perf_counter() - start

    def _dropped(self, pending: _Pending) -> None:
        if not pending.late:
            pending.late = True
            self.stats.draft_dropped_steps += 1

    def _late(self, pending: _Pending, timeout: float) -> None:
        self._dropped(pending)
        self._log_once(
            "late", "hippo: the draft worker's answer for a step came after the %.0f ms deadline; "
            "that step goes on without drafts (counted in vllm:hippo_draft_dropped_steps_total)",
            1000 * timeout,
        )
        oldest = min(self._sent.values(), default=None)
        if oldest is not None and time.perf_counter() - oldest > self.stall_after_s:
            self._lost("stalled", f"no answer for {self.stall_after_s:.1f} s")

    def _receive_one(self) -> None:
        kind, payload = self._channel.recv()
        if kind != "result":
            self._lost("failed", f"unexpected message {kind!r}: {payload}")
            return
        self._sent.pop(payload.seq, None)
        self._results[payload.seq] = (payload, time.perf_counter())
        while len(self._results) > MAX_RESULTS_KEPT:  # results nobody reads (a dropped PendingStep)
            del self._results[min(self._results)]

    # -- the worker's life --------------------------------------------------------------

    def _start_worker(self) -> None:
        self._generation += 1
        self._sent: dict[int, float] = {}
        self._results: dict[int, tuple[StepResult, float]] = {}  # seq -> (result, arrival time)
        endpoint = f"ipc://{tempfile.gettempdir()}/hippo-draft-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        socket = self._ctx.socket(zmq.PAIR)
        socket.bind(endpoint)
        self._channel = Messenger(socket)
        cmd = [sys.executable, "-m", "hippo_vllm.vllm.draft_worker_process", endpoint, str(os.getpid())]
        if self.settings.cpu_cores:
            cmd += ["--cpu-cores", ",".join(map(str, self.settings.cpu_cores))]
        env = {**os.environ, **self.extra_env}
        # The worker imports this very hippo_vllm, wherever it was imported from.
        root = os.path.dirname(os.path.dirname(os.path.abspath(hippo_vllm.__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self._proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)
        # A client dropped without close() (e.g. an engine garbage-collected) takes its worker along.
        weakref.finalize(self, _kill_quietly, self._proc)
        self._started_at = time.perf_counter()
        self._state = STARTING
        self._handshake_step = "hello"

    def _wait_for(self, kind: str, timeout_s: float) -> Any:
        """Block until the worker's start reaches ``kind`` (engine start-up only)."""
        deadline = time.perf_counter() + timeout_s
        while True:
            if self._proc.poll() is not None and not self._channel.poll(0):
                self._stop_worker(graceful=False)
                raise DraftWorkerError(
                    f"the draft worker (pid {self._proc.pid}) exited with code {self._proc.returncode} "
                    f"before it was {kind}; its log is above"
                )
            if not self._channel.poll(min(1.0, max(0.0, deadline - time.perf_counter()))):
                if time.perf_counter() > deadline:
                    self._stop_worker(graceful=False)
                    raise DraftWorkerError(
                        f"the draft worker was not {kind} after {timeout_s:.0f} s "
                        '(speculative_config["draft_worker"]["start_timeout_s"])'
                    )
                continue
            got, payload = self._channel.recv()
            if got == "hello":
                self._channel.send("init", (self.vllm_config, self.hippo))
            elif got == "error":
                self._stop_worker(graceful=False)
                raise DraftWorkerError(
                    f"the draft worker failed in {payload.where}: {payload.error_type}: {payload.message}\n"
                    f"{payload.traceback}"
                )
            elif got == kind:
                return payload

    def _poll_state(self) -> None:
        """Advance a restarting worker without blocking; bump the epoch once it is ready."""
        if self._state != STARTING:
            return
        try:
            while self._channel.poll(0):
                got, payload = self._channel.recv()
                if got == "hello":
                    self._channel.send("init", (self.vllm_config, self.hippo))
                elif got == "ready":
                    self._channel.send("alloc", self._num_blocks)
                elif got == "allocated":
                    self._state = UP
                    self._epoch += 1
                    logger.warning(
                        "hippo: the draft worker is back (pid %d, restart %d of %d); drafting resumes",
                        self._proc.pid, self._restarts, self.settings.max_restarts,
                    )
                    return
                elif got == "error":
                    self._lost("failed to start", f"{payload.error_type}: {payload.message}")
                    return
            if self._proc.poll() is not None:
                self._lost("died while starting", f"exit code {self._proc.returncode}")
            elif time.perf_counter() - self._started_at > self.settings.start_timeout_s:
                self._lost("did not start", f"not ready after {self.settings.start_timeout_s:.0f} s")
        except zmq.ZMQError as exc:
            self._lost("failed to start", repr(exc))

    def _lost(self, what: str, detail: str) -> None:
        """The worker is unusable: kill it; restart it, or leave drafting off."""
        self._stop_worker(graceful=False)
        if self._restarts >= self.settings.max_restarts:
            self._state = OFF
            logger.error(
                "hippo: the draft worker %s (%s) and was restarted %d times "
                '(speculative_config["draft_worker"]["max_restarts"]); drafting stays off for this '
                "engine (outputs are unaffected)", what, detail, self._restarts,
            )
            return
        self._restarts += 1
        self.stats.draft_worker_restarts += 1
        self._log_once(
            f"lost {what}", "hippo: the draft worker %s (%s); restarting it (%d of at most %d); "
            "steps go on without drafts meanwhile", what, detail, self._restarts, self.settings.max_restarts,
        )
        self._start_worker()

    def _stop_worker(self, graceful: bool) -> None:
        proc, channel = self._proc, self._channel
        if proc is not None and proc.poll() is None:
            if graceful and channel is not None:
                try:
                    channel.send("shutdown", block=False)
                    proc.wait(SHUTDOWN_GRACE_S)
                except (zmq.ZMQError, subprocess.TimeoutExpired):
                    pass
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
        if channel is not None:
            endpoint = channel.socket.getsockopt_string(zmq.LAST_ENDPOINT)
            channel.socket.close(linger=0)
            if endpoint.startswith("ipc://"):
                try:
                    os.unlink(endpoint[len("ipc://"):])
                except OSError:
                    pass
        self._channel = None
        self._state = OFF

    def _log_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._logged:
            self._logged.add(key)
            logger.warning(message, *args)
