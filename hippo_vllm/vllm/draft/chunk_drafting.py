"""Draft γ-token chunks for a batch of requests.

The draft's side (``draft_worker``) uses this for both schedules: draft-then-verify
orders chunks after the target sampled, parallel drafting (VPSD) before the
target's forward. Drafted tokens stay on the device from one draft step to the
next (each step's argmax is the next step's input); :meth:`PendingChunks.tokens`
copies the whole chunk to the host once.

In the target's process (``placements.in_process``) the draft runs on the
target's device and stream, so drafting runs in sequence with the target's
forward, never beside it: each draft step also makes small blocking
host-to-device copies (positions, token ids, the attention metadata), and the
attention backends' metadata buffers are shared with the target. Overlapping the
two, as VPSD intends, needs the draft on its own device or worker.

Each request's draft KV holds its compact prompt followed by the output tokens
fed so far (``fed_outputs``). Before drafting, the KV is rolled back to the
longest prefix of ``fed_outputs`` that matches the tokens assumed committed, and
the rest is fed, so rejections, preemption and parallel look-ahead all reduce to
the same rule.
"""

from __future__ import annotations

import dataclasses

import torch

from hippo_vllm.vllm.draft.engine import DraftCapacityError, DraftEngine
from hippo_vllm.vllm.draft.view import DraftView
from hippo_vllm.vllm.protocol import common_prefix


@dataclasses.dataclass
class DraftState:
    """What one request's draft KV holds beyond its compact prompt."""

    view: DraftView
    mrope_delta: int
    fed_outputs: list[int] = dataclasses.field(default_factory=list)
    # A chunk was drafted whose tokens (some fed back into the KV) are still only
    # on the device; fed_outputs catches up when PendingChunks.tokens() reads them.
    chunk_in_flight: bool = False

    def output_position(self, index: int) -> int:
        """M-RoPE position (all three rows) of output token ``index``."""
        return self.view.prompt_len + index + self.mrope_delta


@dataclasses.dataclass
class ChunkRequest:
    req_id: str
    state: DraftState
    outputs: list[int]  # output tokens assumed committed when the chunk is used
    budget: int  # tokens to draft (>= 1)


class PendingChunks:
    """Chunks issued to the device; :meth:`tokens` returns them as lists."""

    def __init__(self, requests: list[ChunkRequest], chunk: torch.Tensor | None):
        self.requests = requests
        for r in requests:
            r.state.chunk_in_flight = True
        self._chunk = chunk  # [R, max budget] on the draft device, -1 past a budget
        self._tokens: list[list[int]] | None = None

    def tokens(self) -> list[list[int]]:
        if self._tokens is None:
            rows = self._chunk.tolist() if self._chunk is not None else []
            self._tokens = [row[: r.budget] for row, r in zip(rows, self.requests)]
            for r, row in zip(self.requests, self._tokens):
                # The first budget-1 drafted tokens were fed back into the draft KV.
                r.state.fed_outputs.extend(row[: r.budget - 1])
                r.state.chunk_in_flight = False
        return self._tokens


class ChunkDrafter:
    """Drafts chunks on the draft engine."""

    def __init__(self, engine: DraftEngine):
        self.engine = engine

    def launch(self, requests: list[ChunkRequest]) -> PendingChunks:
        if not requests:
            return PendingChunks([], None)
        return PendingChunks(requests, self._draft(requests))

    def launch_each(
        self, requests: list[ChunkRequest]
    ) -> tuple[list[tuple[PendingChunks, int] | None], list[tuple[ChunkRequest, Exception]]]:
        """Draft a batch; if it fails, draft each request alone to find the failing ones.

        Returns, per request, its (chunks, row) or None (it failed, or alone it
        found no room in the draft KV cache), and the requests that failed on
        their own with their exception. A ``DraftCapacityError`` of the
        batch is raised as is (no request is at fault).
        """
        try:
            pending = self.launch(requests)
            return [(pending, row) for row in range(len(requests))], []
        except DraftCapacityError:
            raise
        except Exception:
            pass  # one request's input may be at fault: find it
        found: list[tuple[PendingChunks, int] | None] = []
        failures = []
        for r in requests:
            try:
                found.append((self.launch([r]), 0))
            except Exception as exc:  # noqa: BLE001 - capacity included: this request gets none
                found.append(None)
                if not isinstance(exc, DraftCapacityError):
                    failures.append((r, exc))
        return found, failures

    def _draft(self, requests: list[ChunkRequest]) -> torch.Tensor:
        engine = self.engine
        token_ids, positions, query_lens = [], [], []  # the first step's, all requests' rows in order
        for r in requests:
            state = r.state
            assert not state.chunk_in_flight, "a chunk of this request is still in flight"
            # Keep the fed tokens that match, but always refeed the last assumed
            # token: its logits give the first drafted token.
            common = common_prefix(state.fed_outputs, r.outputs[:-1])
            engine.truncate(r.req_id, state.view.compact_len + common)
            del state.fed_outputs[common:]
            new = r.outputs[common:]
            token_ids += new
            first_position = state.output_position(common)
            positions += range(first_position, first_position + len(new))
            query_lens.append(len(new))
        req_ids, token_ids, positions = [r.req_id for r in requests], torch.tensor(token_ids), torch.tensor(positions)
        # Run (and allocate) before touching fed_outputs: a capacity error leaves
        # every request consistent (fed_outputs mirrors the KV).
        max_budget = max(r.budget for r in requests)
        if all(r.budget == max_budget for r in requests):
            chunk = self._at_once(requests, req_ids, query_lens, token_ids, positions, max_budget)
            if chunk is not None:
                return chunk
        # Mixed budgets, or no room for every step: step by step (the chunks end where the room does).
        first = engine.run_tokens(req_ids, query_lens, token_ids, positions).argmax(dim=-1)
        self._fed(requests)
        chunk = torch.full((len(requests), max_budget), -1, dtype=torch.long, device=first.device)
        chunk[:, 0] = first
        # Position of each request's first drafted token; step s feeds token s-1 at this + s-1.
        first_positions = torch.tensor([r.state.output_position(len(r.outputs)) for r in requests])
        everyone = list(range(len(requests)))
        for step in range(1, max_budget):
            rows = [i for i, r in enumerate(requests) if r.budget > step]
            index = slice(None) if rows == everyone else rows
            try:
                logits = engine.run_decode([requests[i].req_id for i in rows], chunk[index, step - 1],
                                           first_positions[index] + (step - 1))
            except DraftCapacityError:
                # Out of draft KV: the chunks end here (shorter drafts are still valid).
                for i in rows:
                    requests[i].budget = step
                break
            chunk[index, step] = logits.argmax(dim=-1)
        return chunk

    def _at_once(self, requests: list[ChunkRequest], req_ids: list[str], query_lens: list[int],
                 token_ids: torch.Tensor, positions: torch.Tensor, steps: int) -> torch.Tensor | None:
        """The whole chunk with its KV rows reserved at once (``DraftEngine.run_greedy``); None,
        nothing changed, when they do not all fit."""
        try:
            chunk = self.engine.run_greedy(req_ids, query_lens, token_ids, positions, steps)
        except DraftCapacityError:
            return None
        self._fed(requests)
        return chunk

    @staticmethod
    def _fed(requests: list[ChunkRequest]) -> None:
        """The first step fed each request's outputs: ``fed_outputs`` mirrors the KV again."""
        for r in requests:
            r.state.fed_outputs.extend(r.outputs[len(r.state.fed_outputs):])
