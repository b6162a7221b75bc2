"""The draft under tensor parallelism: one rank runs it, whole, in a group of its own.

vLLM shards a model by the process-wide tensor-parallel (TP) group: its linear
and embedding layers read the TP size and rank from it when they are built, and
their forwards all-reduce or gather over it. Built under the target's TP group,
the draft would be split across the target's ranks, its collectives would run
beside the target's, and every rank would spend time on it. The draft is small
enough to run whole, so under TP > 1:

- it runs only on the *output rank*, the worker whose outputs and draft tokens
  vLLM's executor reads (TP rank 0 of the last pipeline stage); the other ranks
  load no draft weights and no draft KV cache and propose nothing. vLLM hands the
  output rank's drafts to every rank as the next step's
  ``SchedulerOutput.scheduled_spec_decode_tokens``;
- while the draft is built or run, vLLM's TP group is swapped for a group of one
  rank (:func:`draft_tensor_parallel`, listed in the patch index), so its layers
  are unsharded and every collective in them returns at once (vLLM's group
  operations short-cut a world size of 1);
- the target's s_attn is computed by each rank from its own attention heads and
  summed over the TP group when a request's prefill ends (:func:`make_sum_over_ranks`).

Creating a process group is collective over the whole torch.distributed world, so
every rank calls :func:`make_draft_group`, at the same point of start-up.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from vllm.distributed import parallel_state

from hippo_vllm.vllm.patching import temporarily_patched

DRAFT_GROUP_NAME = "hippo_draft"


def tensor_parallel_size() -> int:
    """The target's TP world size (1 when vLLM set up no parallel state)."""
    if not parallel_state.model_parallel_is_initialized():
        return 1
    return parallel_state.get_tp_group().world_size


def tensor_parallel_rank() -> int:
    """This worker's rank in the target's TP group (0 when there is none)."""
    if not parallel_state.model_parallel_is_initialized():
        return 0
    return parallel_state.get_tp_group().rank_in_group


def is_output_rank() -> bool:
    """Whether vLLM reads this worker's step outputs and draft tokens.

    The multiprocess executor replies from rank ``world_size - tp * pcp``: TP rank
    0 (and prefill-context rank 0) of the last pipeline stage.
    """
    if not parallel_state.model_parallel_is_initialized():
        return True
    return (
        parallel_state.get_tp_group().rank_in_group == 0
        and parallel_state.get_pcp_group().rank_in_group == 0
        and parallel_state.get_pp_group().is_last_rank
    )


def make_draft_group() -> Any | None:
    """A one-rank group coordinator per rank, for the draft; None when TP is 1.

    Collective: every rank of the torch.distributed world must call it, in the same
    order relative to other group creations (each rank creates every one-rank group,
    as ``torch.distributed.new_group`` requires). No device communicator is made,
    so no custom all-reduce buffers or NCCL communicators are set up for it.
    """
    if tensor_parallel_size() == 1:
        return None
    world = parallel_state.get_world_group()
    backend = torch.distributed.get_backend(world.device_group)
    return parallel_state.init_model_parallel_group(
        [[rank] for rank in range(torch.distributed.get_world_size())],
        world.local_rank,
        backend,
        group_name=DRAFT_GROUP_NAME,
        use_device_communicator=False,
    )


@contextlib.contextmanager
def draft_tensor_parallel(group: Any | None) -> Iterator[None]:
    """vLLM's TP group is ``group`` inside the block (nothing changes for None)."""
    if group is None:
        yield
        return
    with temporarily_patched(parallel_state, "_TP", group):
        yield


def make_sum_over_ranks() -> Callable[[torch.Tensor], None] | None:
    """An in-place sum of a CPU tensor over the TP group; None when TP is 1.

    It runs on the group's CPU (gloo) communicator: the tensors are a few small
    partial sums, and this keeps them away from the device communicator and its
    custom all-reduce, which the target's forward uses.
    """
    if tensor_parallel_size() == 1:
        return None
    cpu_group = parallel_state.get_tp_group().cpu_group

    def sum_over_ranks(tensor: torch.Tensor) -> None:
        if tensor.device.type != "cpu":
            raise ValueError(f"sum_over_ranks takes a CPU tensor, got one on {tensor.device}")
        torch.distributed.all_reduce(tensor, group=cpu_group)

    return sum_over_ranks
