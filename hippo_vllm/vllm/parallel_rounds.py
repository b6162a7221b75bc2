"""VPSD in vLLM's step loop: draft the next chunk while the target verifies.

Each step, before the target's forward, every request in decode drafts a
γ-token chunk from the end of (committed tokens + the spec tokens S the target is
about to verify), assuming S will all be accepted. With the draft in the target's
process this runs in sequence with the target's forward, not beside it (see
chunk_drafting); the schedule is PEARL's, the overlap needs a separate draft
device. After
sampling, the pure round logic of ``hippo_vllm.core.vpsd`` decides per request:
if S was accepted and the target's own token equals the chunk's first token, the
rest of the chunk is the next step's spec tokens (optimistic, γ−1 of them);
otherwise the next step carries none while the draft restarts from the corrected
token (conservative). Requests in both modes share one batched step; vLLM's
scheduler takes per-request spec lengths as they come.

vLLM may run a step without calling the drafter (when some request of the batch
is within γ tokens of ``max_model_len``); then it schedules placeholder spec
tokens (or none) next step. Such a step is detected when the next one starts: its
chunks are discarded and each request's round is fed only what it committed, so
it goes conservative; placeholder spec tokens restart the round.

Comparing the target's sampled token with the chunk's first token accepts it
with probability p(token) and otherwise leaves a sample of p without it, which is
speculative sampling with a one-hot draft: exact for greedy and random sampling.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from hippo_vllm.core import RoundStats, VpsdRequest
from hippo_vllm.vllm.chunk_drafting import ChunkDrafter, ChunkRequest, DraftState, PendingChunks
from hippo_vllm.vllm.draft_engine import DraftCapacityError
from hippo_vllm.vllm.metrics import HippoStats


@dataclasses.dataclass
class _Scheduled:
    """A request of the current step that has a round."""

    spec: list[int]  # S, the spec tokens the target verifies this step
    outputs_before: int  # output tokens committed before this step
    ours: bool  # S is a prefix of what the round proposed (not vLLM's placeholders)
    chunk: tuple[PendingChunks, int] | None = None  # this request's chunk and row


FailureCallback = Callable[[str, BaseException, str], None]  # (req id, exception, where)


def _difference(after: RoundStats, before: RoundStats) -> RoundStats:
    return RoundStats(**{
        f.name: getattr(after, f.name) - getattr(before, f.name) for f in dataclasses.fields(RoundStats)
    })


class ParallelRounds:
    """Per-request VPSD rounds of one engine."""

    def __init__(
        self, gamma: int, chunks: ChunkDrafter, stats: HippoStats, max_model_len: int,
        on_failure: FailureCallback,
    ):
        self.gamma = gamma
        self.chunks = chunks
        self.stats = stats
        self.max_model_len = max_model_len
        self.on_failure = on_failure  # a request whose drafting failed: no more rounds
        self._rounds: dict[str, VpsdRequest] = {}
        self._proposed: dict[str, list[int]] = {}  # the spec tokens each round returned last
        self._scheduled: dict[str, _Scheduled] = {}  # this step's, until finish_step

    def _budget(self, state: Any, spec_len: int) -> int:
        """Chunk length: tokens that can still be used after this step commits."""
        produced = len(state.output_token_ids)
        budget = min(self.gamma, self.max_model_len - (state.num_tokens + spec_len + 1))
        params = state.sampling_params
        if params is not None and params.max_tokens is not None:
            budget = min(budget, params.max_tokens - (produced + spec_len + 1))
        return budget

    def launch(self, runner: Any, scheduler_output: Any, states: dict[str, DraftState]) -> None:
        """Draft this step's chunks, before the target's forward."""
        if self._scheduled:
            self._close_skipped_step(runner)
        resumed = scheduler_output.scheduled_cached_reqs.resumed_req_ids
        spec_tokens = scheduler_output.scheduled_spec_decode_tokens
        requests, scheduled = [], []
        for req_id in scheduler_output.num_scheduled_tokens:
            request_state = runner.requests.get(req_id)
            if request_state is None or req_id in resumed or req_id not in self._rounds:
                continue
            spec = list(spec_tokens.get(req_id, ()))
            ours = spec == self._proposed.get(req_id, [])[: len(spec)]
            entry = _Scheduled(spec, len(request_state.output_token_ids), ours)
            self._scheduled[req_id] = entry
            state = states.get(req_id)
            budget = self._budget(request_state, len(spec))
            if state is None or budget <= 0 or not ours:
                continue
            outputs = list(request_state.output_token_ids) + spec
            requests.append(ChunkRequest(req_id, state, outputs, budget))
            scheduled.append(entry)
        if not requests:
            return
        try:
            found, failures = self.chunks.launch_each(requests)
        except DraftCapacityError:
            self.stats.draft_kv_full += len(requests)
            return  # no chunks this step: every request goes conservative
        for entry, chunk in zip(scheduled, found):
            entry.chunk = chunk
        for request, exc in failures:
            self.on_failure(request.req_id, exc, "parallel chunk drafting")
        self.stats.draft_kv_full += found.count(None) - len(failures)  # drafted alone, out of room

    def _close_skipped_step(self, runner: Any) -> None:
        """The last step ran without the drafter: account what each request committed."""
        scheduled, self._scheduled = self._scheduled, {}
        for req_id, entry in scheduled.items():
            if entry.chunk is not None:
                entry.chunk[0].discard()
            request_state = runner.requests.get(req_id)
            if req_id not in self._rounds or request_state is None:
                continue
            committed = list(request_state.output_token_ids[entry.outputs_before :])
            if entry.ours and committed:
                try:
                    self._step(req_id, entry.spec, committed, None)  # no chunk: conservative
                    continue
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

    def resolve(self, req_id: str, scheduled_spec: list[int], sampled: list[int]) -> list[int]:
        """After sampling: the next step's spec tokens for ``req_id``."""
        entry = self._scheduled.get(req_id)
        if entry is not None and not entry.ours:
            # vLLM's placeholder spec tokens after a step without the drafter.
            self._restart(req_id)
            return []
        chunk = None
        if entry is not None and entry.chunk is not None:
            pending, row = entry.chunk
            chunk = pending.tokens()[row] or None
        return self._step(req_id, scheduled_spec, sampled, chunk)

    def _step(self, req_id, spec, sampled, chunk) -> list[int]:
        request = self._rounds[req_id]
        before = dataclasses.replace(request.stats)
        next_spec = request.on_step(spec, sampled, chunk)
        self.stats.record_rounds(_difference(request.stats, before))
        self._proposed[req_id] = next_spec
        return next_spec

    def has(self, req_id: str) -> bool:
        return req_id in self._rounds

    def release(self, req_id: str) -> None:
        request = self._rounds.pop(req_id, None)
        if request is not None:
            before = dataclasses.replace(request.stats)
            request.close()
            self.stats.record_rounds(_difference(request.stats, before))
        self._proposed.pop(req_id, None)
        entry = self._scheduled.pop(req_id, None)
        if entry is not None and entry.chunk is not None:
            entry.chunk[0].tokens()  # the batch's other requests still read theirs

    def finish_step(self) -> None:
        """After ``resolve``: read every chunk still pending so no draft KV is left unresolved."""
        scheduled, self._scheduled = self._scheduled, {}
        for entry in scheduled.values():
            if entry.chunk is not None:
                entry.chunk[0].tokens()
