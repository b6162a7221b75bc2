"""What every placement with the draft outside the target's process shares.

A draft of its own (a worker process, a Ray actor) can die, stall or fall behind
without the target noticing anything but missing drafts. :class:`SupervisedDraft`
is that supervision, once: the state of the draft's side (starting, up, off),
a step that comes back late (its chunks are dropped, the step is counted), the
loss of the draft's side (kill it and restart it, as a supervisor would: at most
``max_restarts`` restarts within any ``restart_window_s``, so a rare fault never
turns drafting off while a crash loop stops with one error), ``epoch`` (bumped
when a restarted side is ready, so the target's side sends its prompts again),
the time drafting was off, and one log line per fault and per recovery. A
placement supplies how to start and stop its side, how to advance a restart, and
when its oldest unanswered step was sent.

Round trips are timed from a step's send to its answer only when the target's
side reads it within its step (a bounded wait): an answer taken in later, from a
step vLLM ran without reading its drafts or one that missed its deadline, may
have waited across idle time and is not a round trip of a busy engine.
"""

from __future__ import annotations

import abc
import collections
import time
from typing import Any

from hippo_vllm.config import HippoConfig
from hippo_vllm.logs import get_logger
from hippo_vllm.vllm.protocol import StepResult
from hippo_vllm.vllm.metrics.stats import HippoStats

logger = get_logger(__name__)

MAX_STEPS_BEHIND = 16  # unanswered steps before the draft's side counts as fallen behind
MIN_STALL_S = 5.0  # silent this long (and 10 deadlines) with work queued: stalled

STARTING, UP, OFF = "starting", "up", "off"


class RestartBudget:
    """At most ``max_restarts`` restarts within any ``window_s`` seconds, as a supervisor allows.

    A rare fault, however many over a server's life, is always restarted; only a
    crash loop (more restarts than that within one window) uses the budget up.
    """

    def __init__(self, max_restarts: int, window_s: float):
        self.max_restarts, self.window_s = max_restarts, window_s
        self._times: collections.deque[float] = collections.deque()

    def take(self, now: float) -> bool:
        """Whether a restart at ``now`` is allowed (then it is counted)."""
        while self._times and now - self._times[0] >= self.window_s:
            self._times.popleft()
        if len(self._times) >= self.max_restarts:
            return False
        self._times.append(now)
        return True

    @property
    def in_window(self) -> int:
        """Restarts counted in the current window."""
        return len(self._times)


class DraftWorkerError(RuntimeError):
    """The draft's worker could not be started."""


class NoDrafts:
    """A step nobody will answer (the draft's side is not up, or the one that had it
    is gone): an empty result, at once, so the proposer's step goes on without drafts."""

    def __init__(self, seq: int):
        self.seq = seq

    def result(self, timeout: float | None = None) -> StepResult:
        return StepResult(self.seq)


class SupervisedPending:
    """A submitted step: read its result through the placement that sent it."""

    def __init__(self, client: SupervisedDraft, seq: int, generation: int, ref: Any = None):
        self._client, self.seq, self.generation, self.ref = client, seq, generation, ref
        self.sent_at = time.perf_counter()
        self.late = False  # its first read missed the deadline: its chunks are dropped
        self.read = False  # read once already (a round trip is timed at most once)

    def result(self, timeout: float | None = None) -> StepResult | None:
        return self._client._result(self, timeout)


class SupervisedDraft(abc.ABC):
    """The supervision of a draft's side that lives outside the target's process.

    Subclasses set ``noun`` (how the log names the draft's side) and implement
    ``_start`` (start a new side; ``_generation`` is already bumped), ``_stop``
    (kill it), ``_advance_start`` (move a restart on without blocking) and
    ``_oldest_unanswered`` (send time of the oldest step not answered, or None).
    """

    noun = "draft worker"
    shares_target_memory = False  # the draft's KV cache lives in its own process's memory

    def __init__(self, hippo: HippoConfig, stats: HippoStats):
        self.hippo = hippo
        self.settings = hippo.draft_worker
        self.stats = stats
        self.stall_after_s = max(MIN_STALL_S, 10 * self.settings.timeout_s)
        self._epoch = 0
        self._generation = 0
        self._restarts = 0  # over the engine's life (the budget is per window)
        self._budget = RestartBudget(self.settings.max_restarts, self.settings.restart_window_s)
        self._down_since: float | None = None  # drafting off since (perf_counter), while not up
        self._down_counted_to = 0.0  # down time up to here is in stats.draft_worker_down_seconds
        self._num_blocks: int | None = None
        self._logged: set[str] = set()
        self._state = OFF

    # -- DraftBackend -------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        if self._state == STARTING:
            self._advance_start()
        return self._epoch

    @property
    def result_timeout(self) -> float:
        """A draft of its own answers within its deadline or its step goes without chunks."""
        return self.settings.timeout_s

    @property
    def is_up(self) -> bool:
        return self._state == UP

    # -- for the placements -------------------------------------------------------------

    def _ready_to_submit(self, seq: int) -> bool:
        """Whether a step can be sent now; if not, it is counted as dropped."""
        if self._state == STARTING:
            self._advance_start()
        if self._state != UP:
            self._count_down_time()
            self.stats.draft_dropped_steps += 1
            return False
        return True

    def _answered(self, pending: SupervisedPending, arrived_at: float, timeout: float) -> None:
        """Count the round trip of a step read within its step (its first, bounded read)."""
        if not pending.late and not pending.read and timeout > 0:
            self.stats.draft_round_trip_seconds += arrived_at - pending.sent_at
            self.stats.draft_round_trips += 1
        pending.read = True

    def _dropped(self, pending: SupervisedPending) -> None:
        if not pending.late:
            pending.late = True
            self.stats.draft_dropped_steps += 1

    def _late(self, pending: SupervisedPending, timeout: float) -> None:
        """The step missed its deadline; a side that has not answered for long is stalled.

        A read with no time to wait (``timeout`` 0: the target's side looking for
        answers that are back, such as those of early encodes) sets no deadline, so
        the step is not counted as dropped; only the stall is checked.
        """
        if timeout <= 0:
            self._check_stall()
            return
        self._dropped(pending)
        self._log_once(
            "late", "hippo: the %s's answer for a step came after the %.0f ms deadline; "
            "that step goes on without drafts (counted in vllm:hippo_draft_dropped_steps_total)",
            self.noun, 1000 * timeout,
        )
        self._check_stall()

    def _check_stall(self) -> None:
        oldest = self._oldest_unanswered()
        if oldest is not None and time.perf_counter() - oldest > self.stall_after_s:
            self._lost("stalled", f"no answer for {self.stall_after_s:.1f} s")

    def _back_up(self, where: str) -> None:
        """A restarted side is ready: drafting resumes, and the target's side re-sends its prompts."""
        self._state = UP
        self._epoch += 1
        off_for = self._count_down_time()
        self._down_since = None
        logger.warning(
            "hippo: the %s is back (%srestart %d, %d within the last %.0f s); drafting resumes after "
            "%.1f s off (vllm:hippo_draft_worker_down_seconds_total)", self.noun, where, self._restarts,
            self._budget.in_window, self.settings.restart_window_s, off_for,
        )

    def _count_down_time(self) -> float:
        """Add the time drafting has been off since the last count; the whole outage so far."""
        if self._down_since is None:
            return 0.0
        now = time.perf_counter()
        self.stats.draft_worker_down_seconds += now - max(self._down_counted_to, self._down_since)
        self._down_counted_to = now
        return now - self._down_since

    def _lost(self, what: str, detail: str) -> None:
        """The draft's side is unusable: kill it; restart it, or leave drafting off (crash loop)."""
        self._stop(graceful=False)
        if self._down_since is None:
            self._down_since = time.perf_counter()
        window = self.settings.restart_window_s
        if not self._budget.take(time.perf_counter()):
            self._state = OFF
            logger.error(
                "hippo: the %s %s (%s) after %d restarts within %.0f s "
                '(speculative_config["draft_worker"]["max_restarts"] per "restart_window_s"): a crash '
                "loop; drafting stays off for this engine (outputs are unaffected)",
                self.noun, what, detail, self._budget.in_window, window,
            )
            return
        self._restarts += 1
        self.stats.draft_worker_restarts += 1
        logger.warning(
            "hippo: the %s %s (%s); restarting it (restart %d, %d of at most %d within %.0f s); "
            "steps go on without drafts meanwhile", self.noun, what, detail, self._restarts,
            self._budget.in_window, self.settings.max_restarts, window,
        )
        self._restart()

    def _restart(self) -> None:
        self._generation += 1
        self._started_at = time.perf_counter()
        self._start()
        self._state = STARTING

    def _start_timed_out(self) -> bool:
        if time.perf_counter() - self._started_at > self.settings.start_timeout_s:
            self._lost("did not start", f"not ready after {self.settings.start_timeout_s:.0f} s")
            return True
        return False

    def _log_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._logged:
            self._logged.add(key)
            logger.warning(message, *args)

    # -- what a placement implements ----------------------------------------------------

    @abc.abstractmethod
    def _start(self) -> None:
        """Start a new draft side (``_generation`` is already bumped)."""

    @abc.abstractmethod
    def _stop(self, graceful: bool) -> None:
        """Stop the draft side; ``_state`` becomes OFF."""

    @abc.abstractmethod
    def _advance_start(self) -> None:
        """Move a restart on without blocking; ``_back_up`` once it is ready."""

    @abc.abstractmethod
    def _oldest_unanswered(self) -> float | None:
        """Send time of the oldest step not answered yet, or None."""
