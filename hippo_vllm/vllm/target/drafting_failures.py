"""Failures inside drafting: counted, logged once per cause, never raised to vLLM.

Speculation is optional for the output (the target verifies every token), so an
error in the draft, the scoring or the proposer's bookkeeping only costs the
affected requests their spec tokens. Each failure is counted per request in
``HippoStats.drafting_failures``; the first occurrence of each distinct cause
(where it happened, the exception type and the line that raised it) is logged
with its traceback, later ones only at debug level, so a failure that repeats
every step does not flood the log.

Failures travel as plain :class:`~hippo_vllm.vllm.protocol.DraftFailure`
records (the traceback already formatted), because the draft's side may run in
another process: ``DraftFailure.from_exception`` makes one on either side, and the
cause is read back from the formatted traceback.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from hippo_vllm.logs import get_logger
from hippo_vllm.vllm.protocol import DraftFailure
from hippo_vllm.vllm.metrics.stats import HippoStats

logger = get_logger(__name__)

MAX_FAILED_STEPS_IN_A_ROW = 3  # steps with a step-wide failure before drafting stops for good

_FRAME = re.compile(r'^\s*File "(?P<file>[^"]*)", line (?P<line>\d+)', re.MULTILINE)


def failure_cause(failure: DraftFailure) -> tuple[str, str, str, int]:
    """(where, exception type, file, line that raised): what makes two failures the same."""
    frames = _FRAME.findall(failure.traceback)
    filename, lineno = (frames[-1][0], int(frames[-1][1])) if frames else ("?", 0)
    return failure.where, failure.error_type, filename, lineno


class DraftingFailures:
    """Counts and logs drafting failures of one proposer."""

    def __init__(self, stats: HippoStats):
        self.stats = stats
        self._logged: set[tuple[str, str, str, int]] = set()
        self.steps_in_a_row = 0  # consecutive steps with a step-wide failure
        self._this_step = False

    def new_step(self) -> None:
        """A target step starts: a streak of step-wide failures ends with a step without one."""
        if not self._this_step:
            self.steps_in_a_row = 0
        self._this_step = False

    def step_failed(self) -> bool:
        """This step had a step-wide failure; True once ``MAX_FAILED_STEPS_IN_A_ROW``
        steps in a row had one (drafting should stop for the engine)."""
        if not self._this_step:
            self._this_step = True
            self.steps_in_a_row += 1
        return self.steps_in_a_row >= MAX_FAILED_STEPS_IN_A_ROW

    def record(self, failure: DraftFailure, req_ids: Iterable[str]) -> None:
        """``req_ids`` lost drafting (for good, or for the step: the caller decides)."""
        req_ids = sorted(req_ids)
        self.stats.drafting_failures += max(1, len(req_ids))
        where = failure.where
        cause = failure_cause(failure)
        if cause in self._logged:
            logger.debug(
                "hippo: drafting failed again in %s (%s: %s) for %s",
                where, failure.error_type, failure.message, req_ids,
            )
            return
        self._logged.add(cause)
        logger.error(
            "hippo: drafting failed in %s for request(s) %s; they continue without speculation "
            "(outputs are unaffected). Logged once per cause:\n%s",
            where, ", ".join(req_ids) or "(none)", failure.traceback.rstrip(),
        )
