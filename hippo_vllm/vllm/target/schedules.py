"""When chunks are drafted: draft-then-verify (serial) or VPSD (parallel).

The proposer asks its schedule four things per step: which chunks to draft before
the target's forward (``plan_before_forward``); after sampling, the next spec
tokens of a request the schedule follows (``follow``, None for one it does not)
and whether the target waits for a chunk drafted now instead (``restart_plan``);
and how a request starts, or restarts, drafting (``start``: spec tokens now and
the chunk to draft now, if any). The chunks drafted now come back through
``drafted``, which gives the next step's spec tokens.
"""

from __future__ import annotations

from hippo_vllm.core.adaptive_length import VerdictDeadline, restart_length
from hippo_vllm.vllm.target.draft_messages import ChunkPlan
from hippo_vllm.vllm.metrics.stats import HippoStats
from hippo_vllm.vllm.protocol import StepResult
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

    def restart_plan(self, record: RequestRecord, next_spec: list[int], chunk: list[int] | None) -> None:
        return None

    def start(self, record: RequestRecord) -> tuple[list[int], ChunkPlan | None]:
        return [], ChunkPlan(record.req_id, record.outputs, record.budget)

    def drafted(self, req_id: str, chunk: list[int]) -> list[int]:
        return chunk

    def release(self, req_id: str) -> None:
        pass

    def finish_step(self) -> None:
        pass


class ParallelSchedule:
    """VPSD (``parallel_rounds``): chunks drafted before the target's forward, resolved after sampling.

    A request's first step is conservative (no spec tokens): its draft prefill and
    first chunk travel with the next step's work.

    With ``restarts`` (a draft of its own), a request whose chunk came back but was
    rejected does not spend the next step without spec tokens: the target waits for
    a short chunk drafted from the corrected token and verifies it next step, while
    the draft drafts on from it. The chunk is γ−1 tokens, or with the adaptive length
    (``deadline``) draft-then-verify's best length at the measured acceptance and
    draft-to-target cost ratio (``restart_length``).
    """

    drafts_before_forward = True

    def __init__(self, gamma: int, stats: HippoStats, deadline: VerdictDeadline | None = None):
        self.rounds = ParallelRounds(gamma, stats)
        self.deadline = deadline
        self.restarts = False  # set for a draft of its own

    @property
    def needs_outputs_after_sampling(self) -> bool:
        return self.restarts  # a restart's chunk starts from the committed outputs

    def plan_before_forward(self, records: list[RequestRecord]) -> list[ChunkPlan]:
        return self.rounds.launch(records)

    def follow(self, record: RequestRecord, chunk: list[int] | None) -> list[int] | None:
        if not self.rounds.has(record.req_id):
            return None
        return self.rounds.resolve(record.req_id, record.spec, record.sampled, chunk)

    def restart_plan(self, record: RequestRecord, next_spec: list[int], chunk: list[int] | None) -> ChunkPlan | None:
        """After ``follow``: the chunk the target waits for, for a request whose chunk came
        back and left no spec tokens (None: none; a chunk that did not come back is no
        reason to wait for another)."""
        if not self.restarts or next_spec or chunk is None or not self.rounds.has(record.req_id):
            return None
        length = min(self._restart_tokens(), record.budget)
        return ChunkPlan(record.req_id, record.outputs, length) if length > 0 else None

    def _restart_tokens(self) -> int:
        cap = self.rounds.gamma - 1  # what vLLM verifies per step in this schedule
        ratio = self.deadline.cost_ratio() if self.deadline is not None else None
        stats = self.rounds.stats
        if ratio is None or not stats.round_drafted_tokens:
            return cap
        return restart_length(stats.round_accepted_tokens / stats.round_drafted_tokens, ratio, cap)

    def time_budget_s(self) -> float | None:
        """What the draft's side may spend on this step's chunks (None: every chunk its budget)."""
        return self.deadline.time_budget_s() if self.deadline is not None else None

    def answered(self, sent_at: float, read_at: float, answered_at: float, result: StepResult | None) -> None:
        """The answer to chunks sent before the forward was read (``result`` None: not back in
        time): with the adaptive length, time the target's step, the way back and the draft."""
        if self.deadline is None:
            return
        worker_seconds = None if result is None else result.prefill_seconds + result.draft_seconds
        self.deadline.observe(sent_at, read_at, answered_at, worker_seconds)
        if result is not None:
            longest = max((len(c) for c in result.chunks.values()), default=0)
            self.deadline.observe_drafting(result.draft_seconds, longest)

    def start(self, record: RequestRecord) -> tuple[list[int], ChunkPlan | None]:
        return self.rounds.start(record.req_id, record.sampled), None

    def drafted(self, req_id: str, chunk: list[int]) -> list[int]:
        """The next spec tokens of a request restarted with ``chunk`` ([]: none came back)."""
        return self.rounds.restart(req_id, chunk) if chunk else []

    def release(self, req_id: str) -> None:
        self.rounds.release(req_id)

    def finish_step(self) -> None:
        self.rounds.finish_step()
