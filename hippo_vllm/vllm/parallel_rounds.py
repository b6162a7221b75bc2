"""VPSD in vLLM's step loop: draft the next chunk while the target verifies.

Each step, before the target's forward, every request in decode launches a
γ-token chunk from the end of (committed tokens + the spec tokens S the target is
about to verify), assuming S will all be accepted (on CUDA on a side stream, so it
runs during the target's forward; on CPU in sequence, by the same calls). After
sampling, the pure round logic of ``hippo_vllm.core.vpsd`` decides per request:
if S was accepted and the target's own token equals the chunk's first token, the
rest of the chunk is the next step's spec tokens (optimistic, γ−1 of them);
otherwise the next step carries none while the draft restarts from the corrected
token (conservative). Requests in both modes share one batched step; vLLM's
scheduler takes per-request spec lengths as they come.

Comparing the target's sampled token with the chunk's first token accepts it
with probability p(token) and otherwise leaves a sample of p without it, which is
speculative sampling with a one-hot draft: exact for greedy and random sampling.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hippo_vllm.core import RoundStats, VpsdRequest
from hippo_vllm.vllm.chunk_drafting import ChunkDrafter, ChunkRequest, DraftState, PendingChunks
from hippo_vllm.vllm.draft_engine import DraftCapacityError
from hippo_vllm.vllm.metrics import HippoStats


@dataclasses.dataclass
class _InFlight:
    spec: list[int]  # S, the spec tokens the target verifies this step
    row: int  # this request's row in the pending chunks


def _difference(after: RoundStats, before: RoundStats) -> RoundStats:
    return RoundStats(**{
        f.name: getattr(after, f.name) - getattr(before, f.name) for f in dataclasses.fields(RoundStats)
    })


class ParallelRounds:
    """Per-request VPSD rounds of one engine."""

    def __init__(self, gamma: int, chunks: ChunkDrafter, stats: HippoStats, max_model_len: int):
        self.gamma = gamma
        self.chunks = chunks
        self.stats = stats
        self.max_model_len = max_model_len
        self._rounds: dict[str, VpsdRequest] = {}
        self._in_flight: dict[str, _InFlight] = {}
        self._pending: PendingChunks | None = None

    def _budget(self, state: Any, spec_len: int) -> int:
        """Chunk length: tokens that can still be used after this step commits."""
        produced = len(state.output_token_ids)
        budget = min(self.gamma, self.max_model_len - (state.num_tokens + spec_len + 1))
        params = state.sampling_params
        if params is not None and params.max_tokens is not None:
            budget = min(budget, params.max_tokens - (produced + spec_len + 1))
        return budget

    def launch(self, runner: Any, scheduler_output: Any, states: dict[str, DraftState]) -> None:
        """Issue this step's chunks, before the target's forward."""
        self._in_flight.clear()
        self._pending = None
        resumed = scheduler_output.scheduled_cached_reqs.resumed_req_ids
        spec_tokens = scheduler_output.scheduled_spec_decode_tokens
        requests = []
        for req_id in scheduler_output.num_scheduled_tokens:
            state = states.get(req_id)
            request_state = runner.requests.get(req_id)
            if state is None or request_state is None or req_id in resumed or req_id not in self._rounds:
                continue
            spec = list(spec_tokens.get(req_id, ()))
            budget = self._budget(request_state, len(spec))
            if budget <= 0:
                continue
            outputs = list(request_state.output_token_ids) + spec
            self._in_flight[req_id] = _InFlight(spec, len(requests))
            requests.append(ChunkRequest(req_id, state, outputs, budget))
        if not requests:
            return
        try:
            self._pending = self.chunks.launch(requests)
        except DraftCapacityError:
            self.stats.draft_kv_full += len(requests)
            self._in_flight.clear()  # no chunks this step: every request goes conservative

    def start(self, req_id: str, sampled: list[int]) -> list[int]:
        """The request's first step (prefill, or a resumed recompute): conservative."""
        self._rounds[req_id] = VpsdRequest(self.gamma)
        return self._step(req_id, [], sampled, None)

    def resolve(self, req_id: str, scheduled_spec: list[int], sampled: list[int]) -> list[int]:
        """After sampling: the next step's spec tokens for ``req_id``."""
        flight = self._in_flight.get(req_id)
        chunk = None
        if flight is not None and self._pending is not None:
            chunk = self._pending.tokens()[flight.row]
        return self._step(req_id, scheduled_spec, sampled, chunk)

    def _step(self, req_id, spec, sampled, chunk) -> list[int]:
        request = self._rounds[req_id]
        before = dataclasses.replace(request.stats)
        next_spec = request.on_step(spec, sampled, chunk)
        self.stats.record_rounds(_difference(request.stats, before))
        return next_spec

    def has(self, req_id: str) -> bool:
        return req_id in self._rounds

    def release(self, req_id: str) -> None:
        request = self._rounds.pop(req_id, None)
        if request is not None:
            before = dataclasses.replace(request.stats)
            request.close()
            self.stats.record_rounds(_difference(request.stats, before))
        self._in_flight.pop(req_id, None)

    def finish_step(self) -> None:
        """Read every chunk still pending so no draft KV is left unresolved."""
        if self._pending is not None:
            self._pending.tokens()
        self._pending = None
        self._in_flight.clear()
