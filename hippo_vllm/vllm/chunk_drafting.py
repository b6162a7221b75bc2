"""Draft γ-token chunks for a batch of requests without waiting on the device.

Both schedules use this: draft-then-verify drafts after the target sampled;
parallel drafting (VPSD) launches it before the target's forward and reads the
tokens after it. Drafted tokens stay on the device from one draft step to the
next (each step's argmax is the next step's input), and positions and KV slots
do not depend on token values, so γ forwards are issued without a host sync. On
a CUDA device they go to a side stream, which lets them run while the target's
forward is issued on the main stream; on CPU the same calls simply run in order.
Only :meth:`PendingChunks.tokens` waits, once, for the whole chunk.

Each request's draft KV holds its compact prompt followed by the output tokens
fed so far (``fed_outputs``). Before drafting, the KV is rolled back to the
longest prefix of ``fed_outputs`` that matches the tokens assumed committed, and
the rest is fed, so rejections, preemption and parallel look-ahead all reduce to
the same rule.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch

from hippo_vllm.vllm.draft_engine import DraftCapacityError, DraftEngine, DraftInput
from hippo_vllm.vllm.draft_view import DraftView


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

    def __init__(self, requests: list[ChunkRequest], chunk: torch.Tensor | None, event: Any):
        self.requests = requests
        for r in requests:
            r.state.chunk_in_flight = True
        self._chunk = chunk  # [R, max budget] on the draft device, -1 past a budget
        self._event = event
        self._tokens: list[list[int]] | None = None

    def tokens(self) -> list[list[int]]:
        if self._tokens is None:
            if self._event is not None:
                self._event.synchronize()
            rows = self._chunk.tolist() if self._chunk is not None else []
            self._tokens = [row[: r.budget] for row, r in zip(rows, self.requests)]
            for r, row in zip(self.requests, self._tokens):
                # The first budget-1 drafted tokens were fed back into the draft KV.
                r.state.fed_outputs.extend(row[: r.budget - 1])
                r.state.chunk_in_flight = False
        return self._tokens


def _side_stream(device: torch.device):
    if device.type != "cuda":
        return None
    return torch.cuda.Stream(device=device)


class ChunkDrafter:
    """Issues chunk drafting on the draft engine (side stream on CUDA)."""

    def __init__(self, engine: DraftEngine):
        self.engine = engine
        self._stream = _side_stream(engine.device)

    @contextlib.contextmanager
    def side_stream(self) -> Iterator[None]:
        """Run draft work issued inside on the side stream (a no-op on CPU)."""
        if self._stream is None:
            yield
            return
        self._stream.wait_stream(torch.cuda.current_stream(self.engine.device))
        with torch.cuda.stream(self._stream):
            yield

    def join(self) -> None:
        """Make the current stream wait for side-stream work (a no-op on CPU)."""
        if self._stream is not None:
            torch.cuda.current_stream(self.engine.device).wait_stream(self._stream)

    def launch(self, requests: list[ChunkRequest]) -> PendingChunks:
        if not requests:
            return PendingChunks([], None, None)
        if self._stream is None:
            return PendingChunks(requests, self._draft(requests), None)
        # The side stream waits for everything the main stream did to the draft's
        # KV and inputs so far (e.g. a compact prefill issued there).
        with self.side_stream():
            chunk = self._draft(requests)
            event = torch.cuda.Event()
            event.record(self._stream)
        return PendingChunks(requests, chunk, event)

    def _draft(self, requests: list[ChunkRequest]) -> torch.Tensor:
        engine = self.engine
        inputs = []
        for r in requests:
            state = r.state
            assert not state.chunk_in_flight, "a chunk of this request is still in flight"
            common = 0
            # Keep the fed tokens that match, but always refeed the last assumed
            # token: its logits give the first drafted token.
            limit = min(len(state.fed_outputs), len(r.outputs) - 1)
            while common < limit and state.fed_outputs[common] == r.outputs[common]:
                common += 1
            engine.truncate(r.req_id, state.view.compact_len + common)
            del state.fed_outputs[common:]
            new = r.outputs[common:]
            positions = torch.tensor([state.output_position(i) for i in range(common, len(r.outputs))])
            inputs.append(
                DraftInput(r.req_id, positions.expand(3, -1), token_ids=torch.tensor(new, dtype=torch.long))
            )
        # Run (and allocate) before touching fed_outputs: a capacity error leaves
        # every request consistent (fed_outputs mirrors the KV).
        first = engine.run(inputs).argmax(dim=-1)
        for r in requests:
            r.state.fed_outputs.extend(r.outputs[len(r.state.fed_outputs):])
        max_budget = max(r.budget for r in requests)
        chunk = torch.full((len(requests), max_budget), -1, dtype=torch.long, device=first.device)
        chunk[:, 0] = first
        for step in range(1, max_budget):
            rows = [i for i, r in enumerate(requests) if r.budget > step]
            step_inputs = []
            for i in rows:
                state = requests[i].state
                position = state.output_position(len(requests[i].outputs) + step - 1)
                step_inputs.append(
                    DraftInput(
                        requests[i].req_id,
                        torch.full((3, 1), position, dtype=torch.long),
                        token_ids=chunk[i, step - 1 : step],
                    )
                )
            try:
                chunk[rows, step] = engine.run(step_inputs).argmax(dim=-1)
            except DraftCapacityError:
                # Out of draft KV: the chunks end here (shorter drafts are still valid).
                for i in rows:
                    requests[i].budget = step
                break
        return chunk
