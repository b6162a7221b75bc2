"""Worker classes that build the hippo model runner (set as ``worker_cls``).

``worker_cls`` is vLLM's official hook for a custom worker; config_rewrite sets
it when ``"method": "hippo"`` is used. The GPU worker has a documented
``_make_model_runner`` hook; the CPU worker constructs its runner through a module
global, which is swapped only while ``init_device`` runs (see the patch index).
"""

from __future__ import annotations

from vllm.v1.worker import cpu_worker
from vllm.v1.worker.cpu_worker import CPUWorker
from vllm.v1.worker.gpu_worker import Worker

from hippo_vllm.vllm.model_runner import hippo_runner_class
from hippo_vllm.vllm.patching import temporarily_patched


class HippoCPUWorker(CPUWorker):
    def init_device(self) -> None:
        runner = hippo_runner_class(cpu_worker.CPUModelRunner)
        with temporarily_patched(cpu_worker, "CPUModelRunner", runner):
            super().init_device()


class HippoGPUWorker(Worker):
    def _make_model_runner(self):
        if self.use_v2_model_runner:
            raise RuntimeError(
                "hippo needs vLLM's V1 model runner; vLLM selected V2. "
                "Set VLLM_USE_V2_MODEL_RUNNER=0."
            )
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        return hippo_runner_class(GPUModelRunner)(self.vllm_config, self.device)
