"""Failures inside drafting: counted, logged once per cause, never raised to vLLM.

Speculation is optional for the output (the target verifies every token), so an
error in the draft, the scoring or the proposer's bookkeeping only costs the
affected requests their spec tokens. Each failure is counted per request in
``HippoStats.drafting_failures``; the first occurrence of each distinct cause
(where it happened, the exception type and the line that raised it) is logged
with its traceback, later ones only at debug level, so a failure that repeats
every step does not flood the log.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterable

from hippo_vllm.logs import get_logger
from hippo_vllm.vllm.metrics import HippoStats

logger = get_logger(__name__)


def failure_cause(where: str, exc: BaseException) -> tuple[str, str, str, int]:
    """(where, exception type, file, line that raised): what makes two failures the same."""
    frames = traceback.extract_tb(exc.__traceback__)
    filename, lineno = (frames[-1].filename, frames[-1].lineno or 0) if frames else ("?", 0)
    return where, type(exc).__qualname__, filename, lineno


class DraftingFailures:
    """Counts and logs drafting failures of one proposer."""

    def __init__(self, stats: HippoStats):
        self.stats = stats
        self._logged: set[tuple[str, str, str, int]] = set()

    def record(self, where: str, exc: BaseException, req_ids: Iterable[str]) -> None:
        """``req_ids`` lost drafting (for good, or for the step: the caller decides)."""
        req_ids = sorted(req_ids)
        self.stats.drafting_failures += max(1, len(req_ids))
        cause = failure_cause(where, exc)
        if cause in self._logged:
            logger.debug("hippo: drafting failed again in %s (%s) for %s", where, exc, req_ids)
            return
        self._logged.add(cause)
        logger.error(
            "hippo: drafting failed in %s for request(s) %s; they continue without speculation "
            "(outputs are unaffected). Logged once per cause:",
            where, ", ".join(req_ids) or "(none)", exc_info=exc,
        )
