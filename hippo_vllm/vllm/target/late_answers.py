"""Answers of the draft's side that were not back in their step.

A draft of its own answers each step's work within its deadline or the step goes
on without chunks. The answer still carries news the target's side must take in
when it comes (views built, failures, prefills that found no room, encodes done),
so it is kept here and read, without waiting, at the start of later steps; only
its chunks are stale.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from hippo_vllm.vllm.placements.backend import PendingStep
from hippo_vllm.vllm.protocol import StepResult
from hippo_vllm.vllm.target.draft_messages import SentStep

# Late answers waiting to be read. A draft of its own that leaves more than 16 steps
# unanswered is restarted (its steps then answer empty at once), so this bound only
# guards against a backend that never answers.
MAX_LATE_STEPS = 64


class LateAnswers:
    """Late answers, read when they come for their news."""

    def __init__(self, take_in: Callable[[SentStep, StepResult], object],
                 forget: Callable[[Iterable[str]], None]):
        # take_in: take an answer's news in; forget: release requests whose answer
        # will never be read (their draft state is rebuilt from the kept view).
        self._take_in = take_in
        self._forget = forget
        self._waiting: list[tuple[SentStep, PendingStep]] = []

    def wait(self, sent: SentStep, pending: PendingStep) -> None:
        """Read this step's answer when it comes (``collect``)."""
        self._waiting.append((sent, pending))
        while len(self._waiting) > MAX_LATE_STEPS:
            # Never to be read: what the draft's side holds of its requests is unknown.
            oldest, _ = self._waiting.pop(0)
            self._forget(oldest.req_ids)

    def collect(self) -> None:
        """Take in every answer that is back; the others keep waiting."""
        waiting, self._waiting = self._waiting, []
        for sent, pending in waiting:
            result = pending.result(0)
            if result is None:
                self._waiting.append((sent, pending))
            else:
                self._take_in(sent, result)

    def clear(self) -> None:
        """Drafting stopped: no answer will be read."""
        self._waiting = []

    @property
    def sent_steps(self) -> list[SentStep]:
        """The steps whose answers are still out (what is kept of them: no video data)."""
        return [sent for sent, _ in self._waiting]

    def __len__(self) -> int:
        return len(self._waiting)
