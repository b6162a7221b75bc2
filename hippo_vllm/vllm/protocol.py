"""The messages between the target's side of drafting and the draft's side.

The target's side (the proposer, in the target's output-rank worker) decides what
to draft; the draft's side (the draft model, its KV cache, its views) drafts it.
They talk only through these plain records, one :class:`StepWork` per target
step and one :class:`StepResult` back, whether the draft runs in the target's
process or in a worker of its own (another device, another node). So they are
small and picklable: per step only token ids travel; a request's video inputs
travel once (:class:`DraftPrompt`), and the target's attention to them once, when
the target's prefill has ended (:class:`Prefill`).
"""

from __future__ import annotations

import dataclasses
import traceback

import torch
from vllm.multimodal.inputs import MultiModalFeatureSpec


@dataclasses.dataclass
class DraftPrompt:
    """Once per request: what the draft needs to build and prefill its view."""

    req_id: str
    prompt_token_ids: list[int]
    mm_features: list[MultiModalFeatureSpec]  # with data (pixels, grid)
    positions: torch.Tensor  # [3, P] int64 M-RoPE positions of the prompt (1-D ones: three equal rows)
    mrope_delta: int  # output token i sits at position P + i + mrope_delta


@dataclasses.dataclass
class Encode:
    """Encode a request's multimodal items now, as it arrives (a draft of its own only).

    Sent in the step that starts the target's prefill, so the draft's vision encoder
    runs while the target prefills; the request's ``Prefill`` then finds the items
    encoded. Its ``DraftPrompt`` still comes with that ``Prefill`` (the positions are
    known only once the target's runner has taken the request in).
    """

    req_id: str
    mm_features: list[MultiModalFeatureSpec]  # with data


@dataclasses.dataclass
class Prefill:
    """Build the request's view (once) and prefill it into the draft's KV cache."""

    req_id: str
    prompt: DraftPrompt | None  # None: the draft's side still holds it (a resumed request)
    attention: list[torch.Tensor | None] | None  # s_attn per video, from the target's prefill


@dataclasses.dataclass
class Release:
    """Free the request's draft KV; a finished request's prompt and view go too."""

    req_id: str
    finished: bool


@dataclasses.dataclass
class ChunkOrder:
    """Draft up to ``budget`` tokens after the output tokens assumed committed.

    Only the change travels: the first ``kept`` tokens of this request's previous
    order's outputs stay, ``new_tokens`` follow them.
    """

    req_id: str
    kept: int
    new_tokens: list[int]
    budget: int


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix (list comparisons run in C: outputs can be long)."""
    low, high = 0, min(len(a), len(b))  # a[:low] == b[:low] holds
    if a[:high] == b[:high]:
        return high  # the usual case: one extends the other
    while low < high - 1:
        mid = (low + high) // 2
        if a[:mid] == b[:mid]:
            low = mid
        else:
            high = mid
    return low


@dataclasses.dataclass
class StepWork:
    """One target step's drafting work, applied in this order: releases, encodes, prefills, chunks."""

    seq: int
    releases: list[Release] = dataclasses.field(default_factory=list)
    encodes: list[Encode] = dataclasses.field(default_factory=list)
    prefills: list[Prefill] = dataclasses.field(default_factory=list)
    chunks: list[ChunkOrder] = dataclasses.field(default_factory=list)
    # PEARL's adaptive length (``"draft_length": "adaptive"``): the seconds the draft's
    # side may take over this step, so that its chunks are as long as fit (each at most
    # its order's budget). None: every chunk is its order's budget long.
    time_budget_s: float | None = None


@dataclasses.dataclass
class ViewReport:
    """What the target's side records of a view the draft built."""

    req_id: str
    keep_rows: torch.Tensor  # [Pc] int64 prompt rows kept, ascending
    prompt_len: int
    video_tokens: int
    video_tokens_seen: int
    pruning_seconds: float
    attention_used: bool

    @property
    def compact_len(self) -> int:
        return int(self.keep_rows.numel())


@dataclasses.dataclass
class DraftFailure:
    """Drafting failed for one request (it goes on without speculation)."""

    req_id: str
    where: str  # e.g. "draft prefill", "chunk drafting"
    error_type: str  # the exception's class name
    message: str
    traceback: str  # formatted where it happened (either side)

    @classmethod
    def from_exception(cls, req_id: str, where: str, exc: BaseException) -> DraftFailure:
        """A plain, picklable record of ``exc`` (``req_id`` "" when no single request is to blame)."""
        return cls(
            req_id=req_id,
            where=where,
            error_type=type(exc).__qualname__,
            message=str(exc),
            traceback="".join(traceback.format_exception(exc)),
        )


@dataclasses.dataclass
class StepResult:
    """The draft's answer to one :class:`StepWork` (same ``seq``)."""

    seq: int
    chunks: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # drafted tokens
    views: list[ViewReport] = dataclasses.field(default_factory=list)  # built this step
    no_room: list[str] = dataclasses.field(default_factory=list)  # paused: draft KV full
    failures: list[DraftFailure] = dataclasses.field(default_factory=list)
    # The whole step failed on the draft's side and no request can be blamed: the
    # step's requests lose drafting for this step (their state is rebuilt next step).
    step_failure: DraftFailure | None = None
    prefill_seconds: float = 0.0  # on the draft's side
    encodes: int = 0  # multimodal items the draft's vision encoder ran on
    draft_seconds: float = 0.0


def work_on_host(work: StepWork) -> StepWork:
    """``work`` with its tensors on the CPU, for a draft of its own.

    The target's s_attn is computed on the target's device; a worker that sees
    other GPUs, or none, could not read it from there. The rest is on the CPU
    already (a moved tensor is the same object).
    """
    if not work.prefills:
        return work
    prefills = []
    for prefill in work.prefills:
        prompt = prefill.prompt
        if prompt is not None and prompt.positions.device.type != "cpu":
            prompt = dataclasses.replace(prompt, positions=prompt.positions.cpu())
        attention = prefill.attention
        if attention is not None:
            attention = [None if a is None else a.cpu() for a in attention]
        prefills.append(dataclasses.replace(prefill, prompt=prompt, attention=attention))
    return dataclasses.replace(work, prefills=prefills)


def result_on_host(result: StepResult) -> StepResult:
    """``result`` with its tensors on the CPU (the kept rows of each view built)."""
    if not result.views:
        return result
    views = [dataclasses.replace(view, keep_rows=view.keep_rows.cpu()) for view in result.views]
    return dataclasses.replace(result, views=views)
