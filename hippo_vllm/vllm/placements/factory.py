"""Where the draft runs: the DraftBackend for ``speculative_config["draft_worker"]``.

- ``in_process``: :class:`~hippo_vllm.vllm.placements.in_process.InProcessDraft`, on the
  output rank's device.
- ``process``: :class:`~hippo_vllm.vllm.placements.process_client.RemoteDraft`. On a GPU
  machine ``device`` names a spare GPU, ``cuda:N``, by its index among the GPUs
  this engine sees (``CUDA_VISIBLE_DEVICES``, if set, is that list). vLLM's
  multiprocess workers do not narrow ``CUDA_VISIBLE_DEVICES`` per rank: each
  picks its GPU by its local rank (offset by the data-parallel rank), so the
  target's ranks use indices ``dp * world_size .. dp * world_size + world_size - 1``
  and the draft must use another one. The worker process is started with only
  that GPU visible. With vLLM 0.33's ``--device-ids`` the target's GPUs are the
  ones that list assigns to those indices (every GPU stays visible).
- ``ray``: :class:`~hippo_vllm.vllm.placements.ray_actor.RayDraft`; Ray assigns the GPU
  (a local Ray started by hippo sees only the spare ones), and one the target uses on
  its node is refused once Ray placed the actor.
"""

from __future__ import annotations

import copy
import os
from typing import Any

from hippo_vllm.config import DraftWorkerConfig, HippoConfig, HippoConfigError
from hippo_vllm.vllm.metrics.stats import HippoStats


def _refuse(key: str, value: Any, allowed: str) -> HippoConfigError:
    return HippoConfigError(f'speculative_config["draft_worker"]["{key}"]={value!r} is not allowed: {allowed}.')


def portable_vllm_config(vllm_config: Any) -> Any:
    """The target's VllmConfig without what its loaded model put in it, so it pickles.

    Once the target is loaded, its compilation config holds the live attention
    layers (``static_forward_context``), which a draft worker neither needs nor
    could receive; the copy shares everything else.
    """
    portable = copy.copy(vllm_config)
    compilation = copy.copy(vllm_config.compilation_config)
    object.__setattr__(compilation, "static_forward_context", {})
    object.__setattr__(compilation, "static_all_moe_layers", [])
    object.__setattr__(portable, "compilation_config", compilation)
    return portable


def target_gpu_indices(parallel_config: Any) -> set[int]:
    """The logical GPU indices (among the visible ones) of this node's target ranks."""
    local_world = getattr(parallel_config, "local_world_size", parallel_config.world_size)
    if hasattr(parallel_config, "get_local_gpu_index"):
        return {parallel_config.get_local_gpu_index(rank) for rank in range(local_world)}
    dp = parallel_config.data_parallel_rank_local or 0
    return set(range(dp * local_world, (dp + 1) * local_world))


def physical_gpu_ids(indices: set[int], visible: str | None) -> set[str]:
    """The ids of ``indices`` in the machine's numbering (as CUDA_VISIBLE_DEVICES and Ray write them)."""
    listed = [v.strip() for v in visible.split(",")] if visible else None
    return {listed[i] if listed is not None and i < len(listed) else str(i) for i in indices}


def target_physical_gpus(parallel_config: Any, visible: str | None) -> set[str]:
    """The machine's ids of this node's target GPUs.

    With vLLM 0.33's ``--device-ids`` (``parallel_config.assigned_physical_gpu_ids``,
    already composed with CUDA_VISIBLE_DEVICES by vLLM) a rank's logical index maps
    through that list, and every GPU stays visible; otherwise through
    CUDA_VISIBLE_DEVICES.
    """
    indices = target_gpu_indices(parallel_config)
    assigned = getattr(parallel_config, "assigned_physical_gpu_ids", None)
    if assigned:
        return {str(assigned[i]) for i in indices if i < len(assigned)}
    return physical_gpu_ids(indices, visible)


def worker_device_env(
    settings: DraftWorkerConfig, device_type: str, target_physical: set[str], visible: str | None, num_gpus: int
) -> dict[str, str]:
    """The worker process's device environment; refuses a device it cannot or must not use.

    ``cuda:N`` counts among the visible GPUs; it is refused when its machine id is
    one of the target's (``target_physical``) or it is not visible.
    """
    device = settings.device
    if device_type != "cuda":
        if device not in (None, "cpu"):
            raise _refuse("device", device, f'"cpu" or null: the target runs on {device_type}')
        return {}
    physical = {i: next(iter(physical_gpu_ids({i}, visible))) for i in range(num_gpus)}
    targets = sorted(i for i, gpu in physical.items() if gpu in target_physical)
    spare = sorted(set(physical) - set(targets))
    if device is None or device == "cpu":
        raise _refuse("device", device,
                      f'"cuda:N" with N a spare GPU (the target uses {targets} of the {num_gpus} visible GPUs)')
    index = int(device.split(":", 1)[1])
    if index not in spare:
        raise _refuse("device", device,
                      f"a GPU the target does not use: one of {spare} (the target uses {targets} "
                      f"of the {num_gpus} visible GPUs)")
    return {"CUDA_VISIBLE_DEVICES": physical[index]}


def make_draft_backend(vllm_config: Any, hippo: HippoConfig, stats: HippoStats, tensor_parallel_group=None):
    """The DraftBackend of ``hippo.draft_worker.placement`` (the draft loaded, its KV not yet)."""
    settings = hippo.draft_worker
    if settings.placement == "in_process":
        from hippo_vllm.vllm.placements.in_process import InProcessDraft
        from hippo_vllm.vllm.draft.worker import DraftWorker

        return InProcessDraft(DraftWorker(vllm_config, hippo, tensor_parallel_group=tensor_parallel_group))
    device_type = vllm_config.device_config.device_type
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    target_gpus = target_physical_gpus(vllm_config.parallel_config, visible) if device_type == "cuda" else set()
    num_gpus = 0
    if device_type == "cuda":
        import torch

        num_gpus = torch.cuda.device_count()  # the visible ones (vLLM narrows nothing per rank)
    if settings.placement == "process":
        from hippo_vllm.vllm.placements.process_client import RemoteDraft

        env = worker_device_env(settings, device_type, target_gpus, visible, num_gpus)
        return RemoteDraft(portable_vllm_config(vllm_config), hippo, stats, env=env)
    from hippo_vllm.vllm.placements.ray_actor import RayDraft

    if settings.device not in (None, "cpu" if device_type != "cuda" else "cuda"):
        raise _refuse("device", settings.device, f'null or "{device_type}": the target runs on {device_type}')
    spare_gpus = physical_gpu_ids(set(range(num_gpus)), visible) - target_gpus
    return RayDraft(portable_vllm_config(vllm_config), hippo, stats, use_gpu=device_type == "cuda",
                    target_physical_gpus=target_gpus, spare_physical_gpus=spare_gpus)
