"""VPSD in vLLM's step loop: draft the next chunk while the target verifies.

Each step, before the target's forward, every request in decode orders a
γ-token chunk from the end of (committed tokens + the spec tokens S the target is
about to verify), assuming S will all be accepted (:meth:`ParallelRounds.launch`
returns the orders; the proposer sends them to the draft's side with the step's
work). With the draft in the target's process it is drafted in sequence with the
target's forward, not beside it; the schedule is PEARL's, the overlap needs the
draft on a device of its own. After sampling, with the chunks as token lists, the
pure round logic of ``hippo_vllm.core.vpsd`` decides per request: if S was
accepted and the target's own token equals the chunk's first token, the rest of
the chunk is the next step's spec tokens (optimistic, γ−1 of them); otherwise the
next step carries none while the draft restarts from the corrected token
(conservative), or, with a draft of its own, the target waits for a short chunk
drafted from the corrected token and verifies it next step
(:meth:`ParallelRounds.restart`). Requests in both modes share one batched step;
vLLM's scheduler takes per-request spec lengths as they come.

vLLM may run a step without calling the drafter (when some request of the batch
is within γ tokens of ``max_model_len``); then it schedules placeholder spec
tokens (or none) next step. Such a step is detected when the next one starts: its
chunks are never used and each request's round is fed only what it committed
(when the request is next scheduled), so it goes conservative; placeholder spec
tokens restart the round.

Everything here works on ``step_records`` and token lists: no vLLM state, no
draft model.

Comparing the target's sampled token with the chunk's first token accepts it
with probability p(token) and otherwise leaves a sample of p without it, which is
speculative sampling with a one-hot draft: exact for greedy and random sampling.
"""

from __future__ import annotations

import dataclasses

from hippo_vllm.core import RoundStats, VpsdRequest
from hippo_vllm.vllm.target.draft_messages import ChunkPlan
from hippo_vllm.vllm.metrics.stats import HippoStats
from hippo_vllm.vllm.target.step_records import RequestRecord


@dataclasses.dataclass
class _Scheduled:
    """A request of the current step that has a round."""

    spec: list[int]  # S, the spec tokens the target verifies this step
    outputs_before: int  # output tokens committed before this step
    ours: bool  # S is a prefix of what the round proposed (not vLLM's placeholders)


def _difference(after: RoundStats, before: RoundStats) -> RoundStats:
    return RoundStats(**{
        f.name: getattr(after, f.name) - getattr(before, f.name) for f in dataclasses.fields(RoundStats)
    })


class ParallelRounds:
    """Per-request VPSD rounds of one engine."""

    def __init__(self, gamma: int, stats: HippoStats):
        self.gamma = gamma
        self.stats = stats
        self._rounds: dict[str, VpsdRequest] = {}
        self._proposed: dict[str, list[int]] = {}  # the spec tokens each round returned last
        self._scheduled: dict[str, _Scheduled] = {}  # this step's, until finish_step
        # Scheduled in a step that ran without the drafter; accounted when next scheduled.
        self._skipped: dict[str, _Scheduled] = {}

    def launch(self, records: list[RequestRecord]) -> list[ChunkPlan]:
        """This step's chunks, before the target's forward (``step_records.before_forward``)."""
        if self._scheduled:  # never resolved: the last step ran without the drafter
            self._skipped.update(self._scheduled)
            self._scheduled = {}
        plans = []
        for record in records:
            req_id = record.req_id
            if req_id not in self._rounds:
                continue
            skipped = self._skipped.pop(req_id, None)
            if skipped is not None:
                self._close_skipped(req_id, skipped, record.outputs)
            spec = record.spec
            ours = spec == self._proposed.get(req_id, [])[: len(spec)]
            self._scheduled[req_id] = _Scheduled(spec, len(record.outputs), ours)
            if record.budget > 0 and ours:
                plans.append(ChunkPlan(req_id, record.outputs + spec, record.budget))
        return plans

    def _close_skipped(self, req_id: str, entry: _Scheduled, outputs: list[int]) -> None:
        """The request's last step ran without the drafter: account what it committed."""
        committed = outputs[entry.outputs_before :]
        if entry.ours and committed:
            try:
                self._step(req_id, entry.spec, committed, None)  # no chunk: conservative
                return
            except ValueError:
                pass  # not a step the round can account (e.g. tokens after a stop)
        self._restart(req_id)

    def _restart(self, req_id: str) -> None:
        """A fresh conservative round; the old one's runs are recorded."""
        self.release(req_id)
        self._rounds[req_id] = VpsdRequest(self.gamma)
        self._proposed[req_id] = []

    def start(self, req_id: str, sampled: list[int]) -> list[int]:
        """The request's first step (prefill, or a resumed recompute): conservative."""
        self._rounds[req_id] = VpsdRequest(self.gamma)
        self._proposed[req_id] = []
        if len(sampled) != 1:
            return []  # it verified vLLM's placeholder spec tokens: not a round of ours
        return self._step(req_id, [], sampled, None)

    def resolve(self, req_id: str, scheduled_spec: list[int], sampled: list[int], chunk: list[int] | None) -> list[int]:
        """After sampling: the next step's spec tokens for ``req_id``, given its chunk (None: none came)."""
        entry = self._scheduled.get(req_id)
        if entry is not None and not entry.ours:
            # vLLM's placeholder spec tokens after a step without the drafter.
            self._restart(req_id)
            return []
        return self._step(req_id, scheduled_spec, sampled, chunk or None)

    def _step(self, req_id, spec, sampled, chunk) -> list[int]:
        request = self._rounds[req_id]
        before = dataclasses.replace(request.stats)
        next_spec = request.on_step(spec, sampled, chunk)
        self.stats.record_rounds(_difference(request.stats, before))
        self._proposed[req_id] = next_spec
        return next_spec

    def restart(self, req_id: str, spec: list[int]) -> list[int]:
        """A request left without spec tokens verifies ``spec`` next step (drafted after
        sampling while the target waited; ``VpsdRequest.restart``)."""
        request = self._rounds[req_id]
        before = dataclasses.replace(request.stats)
        self._proposed[req_id] = request.restart(spec)
        self.stats.record_rounds(_difference(request.stats, before))
        return list(self._proposed[req_id])

    def has(self, req_id: str) -> bool:
        return req_id in self._rounds

    def release(self, req_id: str) -> None:
        request = self._rounds.pop(req_id, None)
        if request is not None:
            before = dataclasses.replace(request.stats)
            request.close()
            self.stats.record_rounds(_difference(request.stats, before))
        self._proposed.pop(req_id, None)
        self._scheduled.pop(req_id, None)
        self._skipped.pop(req_id, None)

    def finish_step(self) -> None:
        """After ``resolve``: this step's rounds are accounted."""
        self._scheduled = {}
