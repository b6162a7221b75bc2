"""Bringing up a draft worker in a process of its own: the steps every such placement takes.

A worker process (``process_worker``) and a Ray actor (``ray_actor``) both run the
draft away from the target's workers, so both must do what vLLM's own worker does
before it loads a model (bind threads, prepare the device, set up a distributed
world) for a world of one rank, then build the draft worker: :func:`bind_threads`
first (before torch is imported where the caller can), then :func:`start_draft_worker`.
"""

from __future__ import annotations

import copy
import os
import sys
from typing import Any


def bind_threads(cores: list[int]) -> None:
    """Bind this process to ``cores``; torch's thread pool is sized for them."""
    os.sched_setaffinity(0, cores)
    os.environ["OMP_NUM_THREADS"] = str(len(cores))
    torch = sys.modules.get("torch")
    if torch is not None:  # imported already: its pool was sized for the old affinity
        torch.set_num_threads(len(cores))


def prepare_device() -> None:
    """The device set-up vLLM's own worker would do before loading a model here."""
    import torch
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        # As vLLM's CPU model runner does: torch.accelerator calls in vLLM's model
        # loading become no-ops (torch has no accelerator to answer them).
        from vllm.v1.worker.cpu_model_runner import _set_torch_accelerator_to_noop

        _set_torch_accelerator_to_noop()
    elif torch.cuda.is_available():
        torch.cuda.set_device(0)  # the one GPU this process sees


def one_rank_config(vllm_config: Any) -> Any:
    """The target's config with the one-rank parallel config vLLM makes for a draft.

    vLLM's ``init_distributed_environment`` reads the current config: under the
    target's, with data parallelism or several nodes, it would turn rank 0 of 1
    into the target's DP rank of the whole DP world and rendezvous at the target's
    DP master or ``master_addr`` (a wait that never ends). The draft's parallel
    config (TP 1, PP 1, DP 1, one node; ``SpeculativeConfig.create_draft_parallel_config``,
    as the draft's own config has it) keeps the world this process's alone.
    """
    from vllm.config.speculative import SpeculativeConfig

    one_rank = copy.copy(vllm_config)
    parallel = SpeculativeConfig.create_draft_parallel_config(vllm_config.parallel_config, 1)
    object.__setattr__(one_rank, "parallel_config", parallel)
    return one_rank


def init_one_rank_world(vllm_config: Any) -> None:
    """A vLLM distributed world of this process alone (gloo), for the draft's layers.

    vLLM reads the current config while it builds the groups: the draft's
    one-rank parallel config serves (:func:`one_rank_config`), whatever the
    target's data parallelism or node count.
    """
    from vllm.config import set_current_vllm_config
    from vllm.distributed.parallel_state import ensure_model_parallel_initialized, init_distributed_environment
    from vllm.utils.network_utils import get_open_port

    with set_current_vllm_config(one_rank_config(vllm_config)):
        init_distributed_environment(
            world_size=1, rank=0, local_rank=0, backend="gloo",
            distributed_init_method=f"tcp://127.0.0.1:{get_open_port()}",
        )
        ensure_model_parallel_initialized(1, 1)


# Of the draft GPU's memory still free once the draft's weights are loaded, the part its
# KV cache may take; the rest is for its activations (vision encoding, prefill chunks).
DRAFT_GPU_KV_FRACTION = 0.8


def blocks_that_fit(requested: int, block_bytes: int, free_bytes: int, fraction: float = DRAFT_GPU_KV_FRACTION) -> int:
    """At most ``requested`` blocks, and no more than ``fraction`` of ``free_bytes`` holds."""
    return max(0, min(requested, int(free_bytes * fraction) // block_bytes))


def allocate_kv_cache_within_device(worker: Any, num_blocks: int) -> int:
    """Allocate the draft's KV cache in a worker of its own; the blocks allocated.

    The target's side sizes the request from the target's token count; a draft on
    a GPU of its own (smaller, or shared) may not hold that much, so on a GPU the
    cache is capped by the memory free there after the weights loaded.
    """
    import torch

    device = torch.device(worker.engine.device)
    if device.type == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info(device)
        block_bytes = int(worker.kv_bytes_per_token * worker.block_size)
        num_blocks = blocks_that_fit(num_blocks, block_bytes, free_bytes)
        if num_blocks == 0:
            raise RuntimeError(
                f"no room for the draft's KV cache on {device}: {free_bytes / 2**30:.2f} GiB free after "
                f"its weights loaded, {block_bytes} bytes per block"
            )
    worker.allocate_kv_cache(num_blocks)
    return num_blocks


def start_draft_worker(vllm_config: Any, hippo: Any):
    """Prepare the device, set up a one-rank world, build the DraftWorker (threads already bound)."""
    from hippo_vllm.vllm.draft.worker import DraftWorker

    prepare_device()
    init_one_rank_world(vllm_config)
    # A worker of its own: no graph pool or compile range of the target's, so its decode steps replay CUDA graphs.
    return DraftWorker(vllm_config, hippo, decode_graphs=True)
