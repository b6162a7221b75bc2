"""The draft in a worker process on a GPU of its own is lossless (GPU only).

Runs under the gpu test profile on a machine with two or more GPUs (`make gpu-check`
runs it there): the target on GPU 0 at the profile's settings (bfloat16, torch.compile
and CUDA graphs), the draft worker on "cuda:1", in both schedules, against the target
alone; drafting must have happened through the worker, and the worker must be gone
after the engine's shutdown.
"""

from __future__ import annotations

import pytest
import torch
from engine_utils import PROFILE, counter, engine, generate_ids, hippo_config, proposer_of, text_request, video_request
from test_draft_worker_backends import wait_gone

pytestmark = [
    pytest.mark.engine,
    pytest.mark.skipif(PROFILE != "gpu" or torch.cuda.device_count() < 2,
                       reason="a draft worker on a GPU of its own: needs the gpu test profile and two GPUs "
                              "(make gpu-check)"),
]


@pytest.fixture(scope="module")
def requests(tiny, tiny_tokenizer):
    videos = tiny.synthetic_videos
    return [video_request(tiny_tokenizer, "Describe this video.", videos[0]),
            video_request(tiny_tokenizer, "What moves in the video?", videos[1 % len(videos)]),
            text_request(tiny_tokenizer, "Which colours appear?")]


@pytest.fixture(scope="module")
def baseline(tiny, requests):
    with engine(tiny.target) as llm:
        return generate_ids(llm, requests, max_tokens=24)


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "vpsd"])
def test_a_draft_worker_on_its_own_gpu_is_lossless(parallel, tiny, requests, baseline):
    config = hippo_config(tiny.draft, parallel=parallel, draft_worker={"placement": "process", "device": "cuda:1"})
    with engine(tiny.target, speculative_config=config) as llm:
        assert generate_ids(llm, requests, max_tokens=24) == baseline
        assert counter(llm, "vllm:spec_decode_num_draft_tokens") > 0
        proposer = proposer_of(llm)
        assert proposer.stats.draft_round_trips > 0
        worker = proposer.draft.worker_pid
    assert wait_gone(worker), "the draft worker outlived the engine"


def test_a_draft_worker_caps_its_kv_cache_by_its_gpus_free_memory(tiny):
    """Asked for far more KV than its GPU holds, the worker allocates what fits and says how much."""
    from vllm.engine.arg_utils import EngineArgs

    from engine_utils import ENGINE_DEFAULTS
    from hippo_vllm.config import HippoConfig
    from hippo_vllm.vllm.metrics.stats import HippoStats
    from hippo_vllm.vllm.placements.process_client import RemoteDraft

    args = {k: v for k, v in ENGINE_DEFAULTS.items() if k != "disable_log_stats"}
    config = EngineArgs(model=str(tiny.target), **args).create_engine_config()
    hippo = HippoConfig(model=str(tiny.draft), draft_worker={"placement": "process", "device": "cuda:1"})
    draft = RemoteDraft(config, hippo, HippoStats(), env={"CUDA_VISIBLE_DEVICES": "1"})
    try:
        wanted = 10**9  # blocks: far beyond any GPU
        allocated = draft.allocate_kv_cache(wanted)
        assert 0 < allocated < wanted
    finally:
        draft.close()
