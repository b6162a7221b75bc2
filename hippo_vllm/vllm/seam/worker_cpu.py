"""The hippo worker for vLLM's CPU platform (set as ``worker_cls`` on CPU).

Kept apart from :mod:`hippo_vllm.vllm.seam.worker_gpu` on purpose: importing vLLM's
CPU worker first imports ``vllm.v1.worker.cpu.shm``, which replaces
``torch.cuda.Stream``/``Event``/``current_stream``, ``torch.accelerator``'s
memory functions, ``Tensor.pin_memory``/``record_stream`` and vLLM's
``async_tensor_h2d`` with CPU stand-ins for the whole process. Only a CPU worker
process may import this module.

The CPU worker constructs its runner through a module global and has no
``_make_model_runner`` hook; the global is swapped only while ``init_device``
runs (see the patch index).
"""

from __future__ import annotations

from vllm.v1.worker import cpu_worker
from vllm.v1.worker.cpu_worker import CPUWorker

from hippo_vllm.vllm.seam.model_runner import hippo_runner_class, reserve_draft_kv_cache
from hippo_vllm.vllm.patching import temporarily_patched


class HippoCPUWorker(CPUWorker):
    def init_device(self) -> None:
        runner = hippo_runner_class(cpu_worker.CPUModelRunner)
        with temporarily_patched(cpu_worker, "CPUModelRunner", runner):
            super().init_device()

    def determine_available_memory(self) -> int:
        # The draft's KV cache comes out of the memory vLLM found for KV caches.
        return reserve_draft_kv_cache(self.model_runner, super().determine_available_memory())
