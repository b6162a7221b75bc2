"""RemoteDraft: the draft in a worker process of its own (``"placement": "process"``).

The client side of :mod:`hippo_vllm.vllm.placements.process_worker`, in the target's
output-rank worker. ``submit`` sends a StepWork and returns at once, so the
worker drafts while the target runs its forward; ``PendingStep.result(timeout)``
waits at most ``timeout`` seconds for that step's StepResult. A step whose
result is not back in time goes on without chunks (None); the result, matched by
its ``seq`` when it arrives, can still be read later for its other news (views,
failures, lack of room). The worker keeps applying every StepWork in order, so a
late step costs only its chunks.

Faults never reach the target: a worker that dies, stalls (no answer for
``stall_after_s``), falls ``MAX_STEPS_BEHIND`` steps behind or cannot take a
message within the step's deadline (a send to a worker that died after its hello
would otherwise wait forever) is killed and restarted in the background, at most
``max_restarts`` times per ``restart_window_s``; meanwhile steps get no drafts
(the supervision is :mod:`hippo_vllm.vllm.placements.supervised`'s, shared with
the Ray placement). Messages travel on vLLM's ZMQ and msgpack helpers
(:mod:`hippo_vllm.vllm.placements.wire`), tensors on the CPU only.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
import weakref
from collections.abc import Mapping
from typing import Any

import zmq

import hippo_vllm
from hippo_vllm.config import HippoConfig
from hippo_vllm.logs import get_logger
from hippo_vllm.vllm.metrics.stats import HippoStats
from hippo_vllm.vllm.placements.wire import Channel, MalformedMessage
from hippo_vllm.vllm.protocol import DraftFailure, StepResult, StepWork, work_on_host
from hippo_vllm.vllm.placements.supervised import (
    MAX_STEPS_BEHIND,
    OFF,
    UP,
    DraftWorkerError,
    NoDrafts,
    SupervisedDraft,
    SupervisedPending,
)

MAX_RESULTS_KEPT = 4 * MAX_STEPS_BEHIND  # answers received and not yet read
SHUTDOWN_GRACE_S = 5.0
DEATH_CHECK_S = 0.05  # while waiting for an answer, whether the worker still lives

logger = get_logger(__name__)


def _kill_quietly(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


class RemoteDraft(SupervisedDraft):
    """A DraftBackend whose draft runs in a worker process of its own."""

    noun = "draft worker"

    def __init__(
        self,
        vllm_config: Any,
        hippo: HippoConfig,
        stats: HippoStats,
        *,
        env: Mapping[str, str] | None = None,
    ):
        super().__init__(hippo, stats)
        self.vllm_config = vllm_config
        self.extra_env = dict(env or {})
        self._ctx = zmq.Context()
        self._proc: subprocess.Popen | None = None
        self._channel: Channel | None = None
        self._restart()
        ready = self._wait_for("ready", self.settings.start_timeout_s)
        self.kv_bytes_per_token, self.block_size = ready
        self._state = UP

    # -- DraftBackend -------------------------------------------------------------------

    @property
    def worker_pid(self) -> int | None:
        """The live worker's process id (None while none is started)."""
        return None if self._proc is None else self._proc.pid

    def allocate_kv_cache(self, num_blocks: int) -> int:
        self._num_blocks = num_blocks
        self._send_at_start("alloc", num_blocks)
        return self._wait_for("allocated", self.settings.start_timeout_s)

    def submit(self, work: StepWork):
        if not self._ready_to_submit(work.seq):
            return NoDrafts(work.seq)
        if self._proc.poll() is not None:
            self.stats.draft_dropped_steps += 1
            self._lost("died", f"exit code {self._proc.returncode}")
            return NoDrafts(work.seq)
        if len(self._sent) >= MAX_STEPS_BEHIND:
            self._lost("fell behind", f"{len(self._sent)} steps unanswered")
            return NoDrafts(work.seq)
        try:
            self._channel.send("work", work_on_host(work), seq=work.seq, block=False)
        except zmq.Again:
            self._lost("fell behind", "its message queue is full")
            return NoDrafts(work.seq)
        pending = SupervisedPending(self, work.seq, self._generation)
        self._sent[work.seq] = pending.sent_at
        return pending

    def close(self) -> None:
        """Stop the worker (it also exits by itself when this process dies)."""
        self._stop(graceful=True)
        self._ctx.term()

    def stall(self, seconds: float) -> None:
        """Make the worker sleep ``seconds`` before its next message (tests of the deadlines)."""
        self._channel.send("stall", seconds)

    # -- results ------------------------------------------------------------------------

    def _result(self, pending: SupervisedPending, timeout: float | None) -> StepResult | None:
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
                    self._answered(pending, arrived_at, timeout)
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

    def _oldest_unanswered(self) -> float | None:
        return min(self._sent.values(), default=None)

    def _receive_one(self) -> None:
        try:
            kind, seq, payload = self._channel.recv()
        except MalformedMessage as bad:
            if bad.kind != "result" or bad.seq < 0:
                self._lost("failed", str(bad))
                return
            # That step goes on without drafts; its requests' draft state is rebuilt.
            kind, seq = "result", bad.seq
            payload = StepResult(seq, step_failure=DraftFailure.from_exception("", "reading a draft answer", bad))
        if kind == "malformed":  # the worker could not read one of our messages; it goes on
            self._log_once("malformed", "hippo: the %s could not read a message: %s: %s",
                           self.noun, payload.error_type, payload.message)
            return
        if kind != "result":
            self._lost("failed", f"unexpected message {kind!r}")
            return
        self._sent.pop(seq, None)
        self._results[seq] = (payload, time.perf_counter())
        while len(self._results) > MAX_RESULTS_KEPT:  # results nobody reads (a dropped PendingStep)
            del self._results[min(self._results)]

    # -- the worker's life --------------------------------------------------------------

    def _start(self) -> None:
        self._sent: dict[int, float] = {}
        self._results: dict[int, tuple[StepResult, float]] = {}  # seq -> (result, arrival time)
        endpoint = Channel.new_path()
        # Sends on the step and restart paths wait at most the step's deadline (a
        # PAIR send blocks while no peer is connected).
        self._channel = Channel(self._ctx, endpoint, bind=True, send_timeout_s=self.settings.timeout_s)
        cmd = [*self._worker_command(), endpoint, str(os.getpid())]
        if self.settings.cpu_cores:
            cmd += ["--cpu-cores", ",".join(map(str, self.settings.cpu_cores))]
        env = {**os.environ, **self.extra_env}
        # The worker imports this very hippo_vllm, wherever it was imported from.
        root = os.path.dirname(os.path.dirname(os.path.abspath(hippo_vllm.__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self._proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)
        # A client dropped without close() (e.g. an engine garbage-collected) takes its worker along.
        weakref.finalize(self, _kill_quietly, self._proc)

    def _worker_command(self) -> list[str]:
        """The worker process's command line, before its endpoint and parent pid."""
        return [sys.executable, "-m", "hippo_vllm.vllm.placements.process_worker"]

    def _init_message(self) -> bytes:
        return pickle.dumps((self.vllm_config, self.hippo), protocol=pickle.HIGHEST_PROTOCOL)

    def _send_at_start(self, kind: str, payload: Any) -> None:
        """A control message during the engine's start-up; a worker that cannot take it is an error."""
        try:
            self._channel.send(kind, payload)
        except zmq.Again:
            self._stop(graceful=False)
            raise DraftWorkerError(
                f"the draft worker did not take its {kind!r} message within "
                f"{self.settings.timeout_s:.3f} s (it died or hangs); its log is above"
            ) from None

    def _wait_for(self, kind: str, timeout_s: float) -> Any:
        """Block until the worker's start reaches ``kind`` (engine start-up only)."""
        deadline = time.perf_counter() + timeout_s
        while True:
            if self._proc.poll() is not None and not self._channel.poll(0):
                self._stop(graceful=False)
                raise DraftWorkerError(
                    f"the draft worker (pid {self._proc.pid}) exited with code {self._proc.returncode} "
                    f"before it was {kind}; its log is above"
                )
            if not self._channel.poll(min(1.0, max(0.0, deadline - time.perf_counter()))):
                if time.perf_counter() > deadline:
                    self._stop(graceful=False)
                    raise DraftWorkerError(
                        f"the draft worker was not {kind} after {timeout_s:.0f} s "
                        '(speculative_config["draft_worker"]["start_timeout_s"])'
                    )
                continue
            try:
                got, _, payload = self._channel.recv()
            except MalformedMessage as bad:
                self._stop(graceful=False)
                raise DraftWorkerError(f"the draft worker sent {bad}") from bad
            if got == "hello":
                self._send_at_start("init", self._init_message())
            elif got == "error":
                self._stop(graceful=False)
                raise DraftWorkerError(
                    f"the draft worker failed in {payload.where}: {payload.error_type}: {payload.message}\n"
                    f"{payload.traceback}"
                )
            elif got == kind:
                return payload

    def _advance_start(self) -> None:
        """Advance a restarting worker without blocking; bump the epoch once it is ready."""
        try:
            while self._channel.poll(0):
                got, _, payload = self._channel.recv()
                # Each send waits at most the step's deadline (a worker that died after its hello).
                if got == "hello":
                    self._channel.send("init", self._init_message())
                elif got == "ready":
                    self._channel.send("alloc", self._num_blocks)
                elif got == "allocated":
                    self._back_up(f"pid {self._proc.pid}, ")
                    return
                elif got == "error":
                    self._lost("failed to start", f"{payload.error_type}: {payload.message}")
                    return
            if self._proc.poll() is not None:
                self._lost("died while starting", f"exit code {self._proc.returncode}")
            else:
                self._start_timed_out()
        except (zmq.ZMQError, MalformedMessage) as exc:
            self._lost("failed to start", repr(exc))

    def _stop(self, graceful: bool) -> None:
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
            channel.close()
        self._channel = None
        self._state = OFF
