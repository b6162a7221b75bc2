"""Target steps from each request's first token to its first step that verifies drafts."""

from __future__ import annotations

from hippo_vllm.vllm.metrics.stats import HippoStats
from hippo_vllm.vllm.target.step_records import RequestRecord


class FirstDrafts:
    """Counts into ``first_draft_steps`` / ``first_drafts`` of ``HippoStats``."""

    def __init__(self, stats: HippoStats):
        self.stats = stats
        self._step = 0  # target steps so far
        # request -> the step of its first token, until its first drafts (then None)
        self._first_token_step: dict[str, int | None] = {}

    def new_step(self) -> None:
        self._step += 1

    def note(self, records: list[RequestRecord], drafts: list[list[int]]) -> None:
        """After a step's proposals: the requests whose drafts the next step verifies."""
        for record in records:
            if not record.sampled:
                continue
            first = self._first_token_step.setdefault(record.req_id, self._step)
            if first is not None and drafts[record.index]:
                self.stats.first_draft_steps += self._step + 1 - first  # verified in the next step
                self.stats.first_drafts += 1
                self._first_token_step[record.req_id] = None

    def forget(self, req_id: str) -> None:
        """The request finished."""
        self._first_token_step.pop(req_id, None)
