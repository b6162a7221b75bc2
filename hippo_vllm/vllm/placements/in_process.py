"""The draft in the target's process (``"placement": "in_process"``, the default).

``submit`` runs the :class:`~hippo_vllm.vllm.draft.worker.DraftWorker` at once, on
the output rank's device and stream, so drafting runs in sequence with the target's
forward; its KV cache is part of the target's KV memory.
"""

from __future__ import annotations

from hippo_vllm.vllm.draft.worker import DraftWorker
from hippo_vllm.vllm.protocol import StepResult, StepWork


class DoneStep:
    """A step whose result is already there."""

    def __init__(self, result: StepResult):
        self._result = result

    def result(self, timeout: float | None = None) -> StepResult:
        return self._result


class InProcessDraft:
    """The draft in the target's process: ``submit`` drafts at once."""

    epoch = 0  # the worker lives as long as the target's process
    result_timeout = None
    shares_target_memory = True

    def __init__(self, worker: DraftWorker):
        self.worker = worker

    @property
    def kv_bytes_per_token(self) -> float:
        return self.worker.kv_bytes_per_token

    @property
    def block_size(self) -> int:
        return self.worker.block_size

    def measure_headroom(self, mm_batch: dict | None = None) -> int:
        """Bytes of the target's device the draft's largest step takes (measured once)."""
        return self.worker.measure_headroom(mm_batch)

    def allocate_kv_cache(self, num_blocks: int) -> int:
        self.worker.allocate_kv_cache(num_blocks)  # sized from the target's KV memory already
        return num_blocks

    def submit(self, work: StepWork) -> DoneStep:
        return DoneStep(self.worker.handle(work))

    def close(self) -> None:
        pass  # the worker's memory goes with the target's process
