"""PEARL's adaptive draft length for a draft of its own: draft until the target's verdict is due.

PEARL lets the draft go on drafting while the target verifies and stops it when
the verdict is back, so each round's chunk is as long as the target's step allows
(about 1/c tokens, c the draft step's cost over the target's) instead of a fixed
γ. In vLLM's step loop the verdict is due when the target has sampled. A draft in
a worker of its own is not interrupted in the middle of a chunk (its steps keep
their tokens on the device, and on a GPU replay as CUDA graphs, so stopping at a
signal would cost a synchronisation per token); the length is chosen as the
chunk starts, from two measured clocks:

- the target's side (:class:`VerdictDeadline`) measures how long the target
  takes from sending a step's work to reading its answer (its forward and
  sampling), and how long an answer spends on the way (the round trip less the
  worker's own time, measured in the steps where the target had to wait for it).
  The difference is the time the worker has; it travels with the work;
- the draft's side (:class:`ChunkLength`) measures its time per drafted token and
  drafts as many tokens as fit in what is left of that time once the step's other
  work (releases, encodes, prefills) is done: at least :data:`MIN_TOKENS` and at
  most the order's budget (``num_speculative_tokens`` or what is left of the
  request's length).

A round that restarts after a rejection drafts while the target waits, as
draft-then-verify does; :func:`restart_length` gives it draft-then-verify's best
length at the measured acceptance and cost ratio.

Both clocks are exponential moving averages, so a change of load or batch moves
them within a few steps. Only timing decides the length; which tokens are
committed never depends on it (every drafted token is verified), so the output
is the target's whatever the clocks say.
"""

from __future__ import annotations

import math

SMOOTHING = 0.3
"""Weight of the newest sample in each moving average."""

MIN_TOKENS = 2
"""A chunk's shortest adaptive length: its first token is compared with the target's
own token, and at least one more is left for the next step to verify."""


def _check_seconds(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number of seconds, got {value!r}")
    return float(value)


class _MovingAverage:
    def __init__(self) -> None:
        self.value: float | None = None

    def add(self, sample: float) -> None:
        self.value = sample if self.value is None else self.value + SMOOTHING * (sample - self.value)


class VerdictDeadline:
    """The target's side: how long the draft's side may take over a step's chunks.

    Call :meth:`observe` once per step whose work carried chunks, with
    ``time.perf_counter()`` readings; :meth:`time_budget_s` is then what the next
    step's work carries.
    """

    WAITED_S = 0.0005
    """A read that took longer than this waited for the answer, so the answer's
    arrival, and with it its time on the way, was measured."""

    def __init__(self) -> None:
        self._target = _MovingAverage()  # from sending the work to reading its answer
        self._transit = _MovingAverage()  # round trip less the worker's own time
        self._per_token = _MovingAverage()  # the draft's drafting time per token, as it reports it

    def observe(self, sent_at: float, read_at: float, answered_at: float, worker_seconds: float | None) -> None:
        """One step: its work was sent at ``sent_at``, the target started reading the
        answer at ``read_at`` and had it at ``answered_at``; ``worker_seconds`` is
        the worker's own time on it (None: the answer was not back in time)."""
        sent_at = _check_seconds("sent_at", sent_at)
        read_at = _check_seconds("read_at", read_at)
        answered_at = _check_seconds("answered_at", answered_at)
        if not sent_at <= read_at <= answered_at:
            raise ValueError(
                f"expected sent_at <= read_at <= answered_at, got {sent_at!r}, {read_at!r}, {answered_at!r}"
            )
        self._target.add(read_at - sent_at)
        if worker_seconds is None:
            return
        worker_seconds = _check_seconds("worker_seconds", worker_seconds)
        if answered_at - read_at > self.WAITED_S:
            self._transit.add(max(0.0, answered_at - sent_at - worker_seconds))

    def observe_drafting(self, seconds: float, tokens: int) -> None:
        """The draft's side reported ``seconds`` of drafting for chunks of at most ``tokens`` tokens."""
        seconds = _check_seconds("seconds", seconds)
        if tokens > 0 and seconds >= 0.0:
            self._per_token.add(seconds / tokens)

    def cost_ratio(self) -> float | None:
        """A drafted token's time over the target's step (None until both were measured)."""
        if self._per_token.value is None or not self._target.value:
            return None
        return self._per_token.value / self._target.value

    def time_budget_s(self) -> float | None:
        """Seconds the draft's side may spend on the next step (None before any step was measured)."""
        if self._target.value is None:
            return None
        return max(0.0, self._target.value - (self._transit.value or 0.0))


class ChunkLength:
    """The draft's side: how many tokens this step's chunks hold.

    :meth:`tokens` picks the length as drafting starts; :meth:`observe` takes in
    how long a chunk took.
    """

    def __init__(self) -> None:
        self._per_token = _MovingAverage()

    def tokens(self, budget: int, time_budget_s: float | None, elapsed_s: float) -> int:
        """The chunk length for orders of at most ``budget`` tokens, ``elapsed_s``
        into a step that may take ``time_budget_s`` (None: no deadline, ``budget``)."""
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise ValueError(f"budget must be an int >= 1 (the most tokens an order asks for), got {budget!r}")
        per_token = self._per_token.value
        if time_budget_s is None or per_token is None or per_token <= 0.0:
            return budget  # no deadline, or nothing measured yet
        left = _check_seconds("time_budget_s", time_budget_s) - _check_seconds("elapsed_s", elapsed_s)
        fits = math.floor(left / per_token) if left > 0 else 0
        return min(budget, max(MIN_TOKENS, fits))

    def observe(self, seconds: float, tokens: int) -> None:
        """A chunk of ``tokens`` tokens (the step's longest) took ``seconds`` to draft."""
        seconds = _check_seconds("seconds", seconds)
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise ValueError(f"tokens must be an int >= 0, got {tokens!r}")
        if tokens > 0 and seconds >= 0.0:
            self._per_token.add(seconds / tokens)


def restart_length(acceptance: float, cost_ratio: float, cap: int) -> int:
    """How many tokens to draft while the target waits, after a rejection.

    A round that restarts after a rejection has the target wait for its chunk, as
    draft-then-verify does, so it drafts draft-then-verify's best length: the
    ``k`` in 1..``cap`` that maximises the tokens committed per unit of time,
    ``(1 − α^(k+1)) / (1 − α) / (1 + k·c)``, with α the per-token ``acceptance``
    and c the ``cost_ratio`` of a draft token to a target step.
    """
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
        raise ValueError(f"cap must be an int >= 1 (the most tokens a restart may draft), got {cap!r}")
    for name, value in (("acceptance", acceptance), ("cost_ratio", cost_ratio)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    alpha = min(float(acceptance), 1.0)

    def rate(k: int) -> float:
        committed = k + 1 if alpha == 1.0 else (1.0 - alpha ** (k + 1)) / (1.0 - alpha)
        return committed / (1.0 + k * cost_ratio)

    return max(range(1, cap + 1), key=rate)
