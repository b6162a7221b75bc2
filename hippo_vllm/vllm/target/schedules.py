"""When chunks are drafted: draft-then-verify (serial) or VPSD (parallel).

The proposer asks its schedule three things per step: which chunks to draft before
the target's forward (``plan_before_forward``); after sampling, the next spec
tokens of a request the schedule follows (``follow``, None for one it does not);
and how a request starts, or restarts, drafting (``start``: spec tokens now and
the chunk to draft now, if any).
"""

from __future__ import annotations

from hippo_vllm.vllm.target.draft_messages import ChunkPlan
from hippo_vllm.vllm.metrics.stats import HippoStats
from hippo_vllm.vllm.target.parallel_rounds import ParallelRounds
from hippo_vllm.vllm.target.step_records import RequestRecord


class SerialSchedule:
    """Draft-then-verify: after sampling, draft from the committed sequence; vLLM verifies next step."""

    drafts_before_forward = False  # nothing to draft before the target's forward
    needs_outputs_after_sampling = True  # the chunks start from the committed outputs

    def plan_before_forward(self, records: list[RequestRecord]) -> list[ChunkPlan]:
        return []

    def follow(self, record: RequestRecord, chunk: list[int] | None) -> list[int] | None:
        return None

    def start(self, record: RequestRecord) -> tuple[list[int], ChunkPlan | None]:
        return [], ChunkPlan(record.req_id, record.outputs, record.budget)

    def release(self, req_id: str) -> None:
        pass

    def finish_step(self) -> None:
        pass


class ParallelSchedule:
    """VPSD (``parallel_rounds``): chunks drafted before the target's forward, resolved after sampling.

    A request's first step is conservative (no spec tokens): its draft prefill and
    first chunk travel with the next step's work.
    """

    drafts_before_forward = True
    needs_outputs_after_sampling = False

    def __init__(self, gamma: int, stats: HippoStats):
        self.rounds = ParallelRounds(gamma, stats)

    def plan_before_forward(self, records: list[RequestRecord]) -> list[ChunkPlan]:
        return self.rounds.launch(records)

    def follow(self, record: RequestRecord, chunk: list[int] | None) -> list[int] | None:
        if not self.rounds.has(record.req_id):
            return None
        return self.rounds.resolve(record.req_id, record.spec, record.sampled, chunk)

    def start(self, record: RequestRecord) -> tuple[list[int], ChunkPlan | None]:
        return self.rounds.start(record.req_id, record.sampled), None

    def release(self, req_id: str) -> None:
        self.rounds.release(req_id)

    def finish_step(self) -> None:
        self.rounds.finish_step()
