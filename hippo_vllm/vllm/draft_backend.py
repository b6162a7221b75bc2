"""Where the draft runs, behind one interface: :class:`DraftBackend`.

The proposer (the target's side) sends one ``StepWork`` per target step through
``submit`` and reads its ``StepResult`` from the returned :class:`PendingStep`.
:class:`InProcessDraft` runs a :class:`~hippo_vllm.vllm.draft_worker.DraftWorker`
in the target's process, on its device: the work is done inside ``submit``, in
sequence with the target's forward. A placement with the draft in a process of
its own implements the same protocol; its ``submit`` returns at once.
"""

from __future__ import annotations

from typing import Protocol

from hippo_vllm.vllm.draft_protocol import StepResult, StepWork
from hippo_vllm.vllm.draft_worker import DraftWorker


class PendingStep(Protocol):
    def result(self, timeout: float | None) -> StepResult | None:
        """The step's result; None when it is not back within ``timeout`` seconds
        (late: the target's side drops its chunks)."""


class DraftBackend(Protocol):
    # Bumped when the draft's side lost all its state (a worker of its own
    # restarted): the target's side then forgets what it sent (prompts, prefills,
    # order mirrors) and sends it again.
    epoch: int
    kv_bytes_per_token: float
    block_size: int

    def allocate_kv_cache(self, num_blocks: int) -> None: ...

    def submit(self, work: StepWork) -> PendingStep:
        """Hand over one step's work; a placement of its own never blocks on drafting here."""

    def close(self) -> None: ...


class DoneStep:
    """A step whose result is already there."""

    def __init__(self, result: StepResult):
        self._result = result

    def result(self, timeout: float | None = None) -> StepResult:
        return self._result


class InProcessDraft:
    """The draft in the target's process: ``submit`` drafts at once."""

    epoch = 0  # the worker lives as long as the target's process

    def __init__(self, worker: DraftWorker):
        self.worker = worker

    @property
    def kv_bytes_per_token(self) -> float:
        return self.worker.kv_bytes_per_token

    @property
    def block_size(self) -> int:
        return self.worker.block_size

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.worker.allocate_kv_cache(num_blocks)

    def submit(self, work: StepWork) -> DoneStep:
        return DoneStep(self.worker.handle(work))

    def close(self) -> None:
        pass  # the worker's memory goes with the target's process
