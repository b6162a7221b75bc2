"""Which device a draft worker process gets, and which it is refused (pure logic, no GPU needed)."""

from __future__ import annotations

import types

import pytest

from hippo_vllm.config import DraftWorkerConfig, HippoConfigError
from hippo_vllm.vllm.placements.factory import (
    physical_gpu_ids,
    target_gpu_indices,
    target_physical_gpus,
    worker_device_env,
)

TP4 = {"0", "1", "2", "3"}  # the machine's ids of a TP-4 target's GPUs, nothing narrowed


def process(device=None):
    return DraftWorkerConfig(placement="process", device=device)


def test_a_spare_gpu_is_the_only_one_the_worker_sees():
    assert worker_device_env(process("cuda:4"), "cuda", TP4, None, 8) == {"CUDA_VISIBLE_DEVICES": "4"}
    # cuda:N counts among the visible GPUs, as the target's ranks do.
    visible = "2,3,5,7,6"
    target = physical_gpu_ids({0, 1, 2, 3}, visible)
    assert worker_device_env(process("cuda:4"), "cuda", target, visible, 5) == {"CUDA_VISIBLE_DEVICES": "6"}


@pytest.mark.parametrize(
    "device, visible, num_gpus, needle",
    [
        ("cuda:2", None, 8, r'\["device"\]=\'cuda:2\' .*one of \[4, 5, 6, 7\] \(the target uses \[0, 1, 2, 3\]'),
        ("cuda:5", "0,1,2,3,4", 5, r"one of \[4\] \(the target uses \[0, 1, 2, 3\] of the 5 visible GPUs\)"),
        (None, None, 8, r'\["device"\]=None .*"cuda:N" with N a spare GPU'),
        ("cpu", None, 8, r'\["device"\]=\'cpu\' '),
    ],
)
def test_a_target_gpu_a_missing_one_or_none_is_refused_on_a_gpu_machine(device, visible, num_gpus, needle):
    with pytest.raises(HippoConfigError, match=needle):
        worker_device_env(process(device), "cuda", physical_gpu_ids({0, 1, 2, 3}, visible), visible, num_gpus)


def test_device_ids_map_the_target_to_the_gpus_it_was_given():
    # vllm serve --device-ids 4,5,6,7 -tp 4: every GPU stays visible, the ranks' logical
    # indices 0-3 are physical GPUs 4-7 (vLLM 0.33's assigned_physical_gpu_ids).
    config = types.SimpleNamespace(world_size=4, data_parallel_rank_local=0, assigned_physical_gpu_ids=[4, 5, 6, 7])
    target = target_physical_gpus(config, None)
    assert target == {"4", "5", "6", "7"}
    assert worker_device_env(process("cuda:0"), "cuda", target, None, 8) == {"CUDA_VISIBLE_DEVICES": "0"}
    with pytest.raises(HippoConfigError, match=r"one of \[0, 1, 2, 3\] \(the target uses \[4, 5, 6, 7\]"):
        worker_device_env(process("cuda:4"), "cuda", target, None, 8)
    # Without --device-ids the logical indices are the visible ones.
    plain = types.SimpleNamespace(world_size=4, data_parallel_rank_local=0, assigned_physical_gpu_ids=None)
    assert target_physical_gpus(plain, "3,2,1,0,7") == {"3", "2", "1", "0"}


def test_on_a_cpu_machine_the_worker_runs_on_the_cpu():
    assert worker_device_env(process(), "cpu", set(), None, 0) == {}
    assert worker_device_env(process("cpu"), "cpu", set(), None, 0) == {}
    with pytest.raises(HippoConfigError, match=r'\["device"\]=\'cuda:1\' .*the target runs on cpu'):
        worker_device_env(process("cuda:1"), "cpu", set(), None, 0)


def test_the_target_gpus_follow_vllms_local_rank_mapping():
    # vLLM's ParallelConfig.get_local_gpu_index: local rank + data-parallel rank x world size.
    config = types.SimpleNamespace(local_world_size=4, world_size=4,
                                   get_local_gpu_index=lambda rank: rank + 1 * 4)
    assert target_gpu_indices(config) == {4, 5, 6, 7}
    older = types.SimpleNamespace(world_size=2, data_parallel_rank_local=1)
    assert target_gpu_indices(older) == {2, 3}
    assert physical_gpu_ids({0, 2}, "5,6,7") == {"5", "7"}
    assert physical_gpu_ids({1}, None) == {"1"}


def test_a_draft_of_its_own_gets_no_more_kv_blocks_than_its_device_holds():
    from hippo_vllm.vllm.placements.bootstrap import DRAFT_GPU_KV_FRACTION, blocks_that_fit

    gib = 2**30
    # 10 GiB free after the weights, 2 MiB blocks: the requested 100k blocks become what fits.
    fitting = int(10 * gib * DRAFT_GPU_KV_FRACTION) // (2 * 2**20)
    assert blocks_that_fit(100_000, 2 * 2**20, 10 * gib) == fitting < 100_000
    assert blocks_that_fit(1_000, 2 * 2**20, 10 * gib) == 1_000  # a request that fits is kept
    assert blocks_that_fit(1_000, 2 * 2**20, 0) == 0
