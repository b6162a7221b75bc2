"""The target's side of the draft protocol: each step's ``StepWork``, and what the draft's side holds.

The draft's side keeps per request a prompt, a prefilled draft KV, a view and the
outputs of its last chunk order; the target's side sends each only when the
draft's side lacks it: a request's ``DraftPrompt`` travels with its first
``Prefill`` (and again only after a finished ``Release`` or a lost draft), a
``Prefill`` goes before a request's first chunk order (and again after a release,
or when the draft's KV had no room for it), the target's s_attn only while the
request has no view, and each ``ChunkOrder`` carries only the change to the
request's last order. Releases wait here for the next step's work.

A draft of its own is also sent a request's multimodal items as the request
arrives (``Encode``), so its vision encoder runs while the target prefills.

When the draft's side lost all its state (its backend's ``epoch`` changed) every
record of what it holds is forgotten, so everything is sent again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import torch

from hippo_vllm.vllm.protocol import (
    ChunkOrder,
    DraftPrompt,
    Encode,
    Prefill,
    Release,
    StepResult,
    StepWork,
    common_prefix,
)


@dataclasses.dataclass(frozen=True)
class ChunkPlan:
    """A chunk to draft: ``budget`` tokens after ``outputs`` (the output tokens assumed committed)."""

    req_id: str
    outputs: list[int]
    budget: int


@dataclasses.dataclass(frozen=True)
class SentStep:
    """What the target's side keeps of a sent step's work until its answer is read.

    Not the work itself: a late answer may be read many steps later, and the work
    can hold a request's video inputs.
    """

    seq: int
    prefilled: frozenset[str]  # requests whose prefill the work carried
    req_ids: tuple[str, ...]  # every request the work touched (a step-wide failure costs them)
    chunks: bool = False  # the work ordered chunks

    @classmethod
    def of(cls, work: StepWork) -> SentStep:
        prefilled = [p.req_id for p in work.prefills]
        return cls(work.seq, frozenset(prefilled),
                   tuple(dict.fromkeys(prefilled + [c.req_id for c in work.chunks])), bool(work.chunks))


class DraftMessages:
    """Builds the step's work for the draft's side and remembers what it holds."""

    def __init__(self) -> None:
        self.epoch = 0
        self._seq = 0
        self._prompts: set[str] = set()  # the draft's side holds their DraftPrompt
        self._prefilled: set[str] = set()  # their draft KV is prefilled, as far as is known
        self._orders: dict[str, list[int]] = {}  # each request's last order's outputs (the mirror)
        self._views: set[str] = set()  # reported built
        self._encoded: set[str] = set()  # sent to be encoded on arrival
        self._releases: list[Release] = []

    def sync_epoch(self, epoch: int) -> None:
        """Forget what the draft's side held if it lost it all."""
        if epoch != self.epoch:
            self.epoch = epoch
            self._prompts.clear()
            self._prefilled.clear()
            self._orders.clear()
            self._views.clear()
            self._encoded.clear()
            self._releases.clear()

    def release(self, req_id: str, finished: bool) -> None:
        """Queue a release for the next step's work (if the draft's side holds anything of it)."""
        held = (req_id in self._prompts or req_id in self._prefilled or req_id in self._orders
                or req_id in self._encoded)
        self._prefilled.discard(req_id)
        self._orders.pop(req_id, None)
        if finished:
            self._prompts.discard(req_id)
            self._views.discard(req_id)
            self._encoded.discard(req_id)
        if held:
            self._releases.append(Release(req_id, finished))

    def resend_prompts(self, req_ids: Iterable[str]) -> None:
        """Send these requests' prompts again with their next prefill (the draft's side may lack them)."""
        self._prompts.difference_update(req_ids)

    def requeue(self, releases: list[Release]) -> None:
        """Releases of a work that never reached the draft's side."""
        self._releases[:0] = releases

    def work(
        self,
        plans: list[ChunkPlan],
        prompt_of: Callable[[str], DraftPrompt],
        attention_of: Callable[[str], list[torch.Tensor | None] | None],
        arriving: Iterable[tuple[str, list]] = (),
        time_budget_s: float | None = None,
    ) -> StepWork:
        """This step's work: queued releases, the arriving requests' items to encode (req_id,
        mm_features), the prefills the chunks need, the chunk orders (as long as fit in
        ``time_budget_s`` on the draft's side, if given)."""
        encodes = []
        for req_id, mm_features in arriving:
            if req_id not in self._prompts and req_id not in self._encoded:
                encodes.append(Encode(req_id, mm_features))
                self._encoded.add(req_id)
        prefills, orders = [], []
        for plan in plans:
            req_id = plan.req_id
            if req_id not in self._prefilled:
                prompt = None if req_id in self._prompts else prompt_of(req_id)
                attention = None if req_id in self._views else attention_of(req_id)
                prefills.append(Prefill(req_id, prompt, attention))
                self._prompts.add(req_id)
                self._prefilled.add(req_id)
            previous = self._orders.get(req_id, [])
            kept = common_prefix(previous, plan.outputs)
            self._orders[req_id] = list(plan.outputs)
            orders.append(ChunkOrder(req_id, kept, plan.outputs[kept:], plan.budget))
        work = StepWork(self._seq, releases=self._releases, encodes=encodes, prefills=prefills, chunks=orders,
                        time_budget_s=time_budget_s if orders else None)
        self._seq += 1
        self._releases = []
        return work

    def received(self, sent: SentStep, result: StepResult) -> None:
        """Learn from the draft's answer (in time or late): views built, prefills that found no room."""
        self._views.update(report.req_id for report in result.views)
        for req_id in result.no_room:
            if req_id in sent.prefilled:
                self._prefilled.discard(req_id)  # sent again with its next chunk

    def held_requests(self) -> list[str]:
        """Requests the draft's side holds anything of."""
        return sorted(self._prompts | self._prefilled | set(self._orders) | self._views | self._encoded)

    def has_view(self, req_id: str) -> bool:
        return req_id in self._views

    @property
    def num_prefilled(self) -> int:
        return len(self._prefilled)

    @property
    def num_views(self) -> int:
        return len(self._views)
