"""Hippo under tensor parallelism is lossless against the target alone at the same size.

Needs HIPPO_TEST_TP >= 2 and as many GPUs (`make gpu-check` sets it on a machine with
two): with several workers the proposer lives in worker processes, so this test
reads only what the engine reports (outputs and vLLM's spec-decode counters).
"""

from __future__ import annotations

import pytest
from engine_utils import TENSOR_PARALLEL, counter, engine, generate_ids, hippo_config, text_request, video_request

pytestmark = [
    pytest.mark.engine,
    pytest.mark.skipif(TENSOR_PARALLEL < 2, reason="tensor parallelism: runs with HIPPO_TEST_TP=2 on two GPUs "
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
def test_tensor_parallel_hippo_is_lossless_and_drafts(parallel, tiny, requests, baseline):
    with engine(tiny.target, speculative_config=hippo_config(tiny.draft, parallel=parallel)) as llm:
        assert generate_ids(llm, requests, max_tokens=24) == baseline
        assert counter(llm, "vllm:spec_decode_num_draft_tokens") > 0


def test_tensor_parallel_a_fault_that_switches_drafting_off_keeps_every_rank_summing(tiny, requests, baseline):
    """The output rank stops drafting after repeated failures; the other ranks still sum
    s_attn with it (a collective), so new video prefills neither hang nor change outputs."""

    def break_drafting(worker):
        drafter = worker.model_runner.drafter
        if drafter.draft is not None:
            def submit(work):
                raise RuntimeError("injected draft fault")
            drafter.draft.submit = submit

    def disabled(worker):
        drafter = worker.model_runner.drafter
        return drafter.draft is not None and drafter.disabled

    with engine(tiny.target, speculative_config=hippo_config(tiny.draft, parallel=False)) as llm:
        assert generate_ids(llm, requests, max_tokens=24) == baseline
        llm.collective_rpc(break_drafting)
        assert generate_ids(llm, requests, max_tokens=24) == baseline
        assert any(llm.collective_rpc(disabled))
        assert generate_ids(llm, requests, max_tokens=24) == baseline  # new prefills, drafting off
