"""Where the draft runs, behind one interface: :class:`DraftBackend`.

The proposer (the target's side) sends one ``StepWork`` per target step through
``submit`` and reads its ``StepResult`` from the returned :class:`PendingStep`.
It knows only this interface; which placement serves it is chosen by
:func:`hippo_vllm.vllm.placements.factory.make_draft_backend`, called by the hippo
model runner. The placements: ``in_process`` (the draft in the target's process,
in sequence with its forward), ``process_client`` (a worker process of its own)
and ``ray_actor`` (a Ray actor); the last two share ``supervised``.
"""

from __future__ import annotations

from typing import Protocol

from hippo_vllm.vllm.protocol import StepResult, StepWork


class PendingStep(Protocol):
    def result(self, timeout: float | None) -> StepResult | None:
        """The step's result; None when it is not back within ``timeout`` seconds
        (late: the target's side drops its chunks and reads the rest later)."""


class DraftBackend(Protocol):
    # Bumped when the draft's side lost all its state (a worker of its own
    # restarted): the target's side then forgets what it sent (prompts, prefills,
    # order mirrors) and sends it again.
    epoch: int
    kv_bytes_per_token: float
    block_size: int
    # How long the target's side waits for a step's result after sampling: None
    # (the result is there when ``submit`` returns) or the worker's deadline.
    result_timeout: float | None
    # Whether the draft's KV cache comes out of the target's KV memory (same device).
    shares_target_memory: bool

    def allocate_kv_cache(self, num_blocks: int) -> int:
        """Allocate the draft's KV cache; the blocks allocated (a draft on a GPU of its
        own caps them by the memory free there)."""

    def submit(self, work: StepWork) -> PendingStep:
        """Hand over one step's work; a placement of its own never blocks on drafting here."""

    def close(self) -> None: ...
