"""The hippo worker for CUDA GPUs (set as ``worker_cls`` on every non-CPU platform).

It uses the GPU worker's documented ``_make_model_runner`` hook. This module must
never import vLLM's CPU worker, not even indirectly: that import switches the
whole process into vLLM's CPU mode (see :mod:`hippo_vllm.vllm.seam.worker_cpu`), and
vLLM imports ``worker_cls`` inside the GPU worker process.
"""

from __future__ import annotations

from vllm.v1.worker.gpu_worker import Worker

from hippo_vllm.vllm.seam.model_runner import hippo_runner_class, reserve_draft_kv_cache


class HippoGPUWorker(Worker):
    def _make_model_runner(self):
        if self.use_v2_model_runner:
            raise RuntimeError(
                "hippo needs vLLM's V1 model runner; vLLM selected V2. "
                "Set VLLM_USE_V2_MODEL_RUNNER=0."
            )
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        return hippo_runner_class(GPUModelRunner)(self.vllm_config, self.device)

    def determine_available_memory(self) -> int:
        # The draft's KV cache comes out of the memory vLLM found for KV caches
        # (gpu_memory_utilization or kv_cache_memory_bytes covers target and draft).
        return reserve_draft_kv_cache(self.model_runner, super().determine_available_memory())
