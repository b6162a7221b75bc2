"""s_attn captured on tensor-parallel ranks and summed at prefill end equals one rank's capture of every head.

Unit test of the capture's bookkeeping with stand-ins for vLLM's attention impls (each
rank with a paged KV cache of its own heads), runner and scheduler output (shapes as
vLLM passes them: ``[tokens, heads * d]``);
the ranks are threads and the sum over ranks is a barrier. The real thing runs in
tests/vllm/test_tensor_parallel.py.
"""

from __future__ import annotations

import threading
from functools import partial
from types import SimpleNamespace

import pytest
import torch

from paged_attention_stand_in import PagedImpl, run_layer

from hippo_vllm.vllm.target.attention_capture import TargetAttentionCapture
from hippo_vllm.vllm.target.step_records import batch_rows, step_start

H_Q, H_KV, D, LAYERS = 4, 2, 8, (0, 1)
TEXT_BEFORE, VIDEO, TEXT_AFTER = 3, 6, 4
PROMPT_LEN = TEXT_BEFORE + VIDEO + TEXT_AFTER


def make_capture(num_heads, num_kv_heads, sum_over_ranks=None) -> TargetAttentionCapture:
    layers = {i: SimpleNamespace(impl=PagedImpl(num_heads, num_kv_heads, D, D**-0.5, PROMPT_LEN,
                                                torch.Generator().manual_seed(i)))
              for i in LAYERS}
    capture = TargetAttentionCapture(layers, LAYERS, sum_over_ranks=sum_over_ranks)
    capture.track("req", PROMPT_LEN, [(TEXT_BEFORE, VIDEO)], [(TEXT_BEFORE, VIDEO)])
    return capture


def prefill(capture, queries, keys, chunks) -> None:
    """Run the prompt through the capture in ``chunks`` steps, as vLLM's chunked prefill would."""
    done = 0
    for n in chunks:
        runner = SimpleNamespace(input_batch=SimpleNamespace(req_ids=["req"]),
                                 requests={"req": SimpleNamespace(num_computed_tokens=done)})
        cached = SimpleNamespace(req_ids=["req"], num_computed_tokens=[done], resumed_req_ids=set())
        scheduler_output = SimpleNamespace(num_scheduled_tokens={"req": n}, scheduled_new_reqs=[],
                                           scheduled_cached_reqs=cached, finished_req_ids=set())
        capture.begin_step(step_start(runner, scheduler_output), partial(batch_rows, runner, scheduler_output))
        for i in LAYERS:
            run_layer(capture.layers[i], queries[i][done : done + n], keys[i][done : done + n], done)
        capture.sum_ended_prefills()
        capture.end_step()
        done += n


def rank_shard(tensors, rank, heads_per_rank):
    """Rank ``rank``'s heads of ``[tokens, heads * D]`` tensors (vLLM shards heads contiguously)."""
    lo, hi = rank * heads_per_rank * D, (rank + 1) * heads_per_rank * D
    return {i: t[:, lo:hi] for i, t in tensors.items()}


def run_ranks(world, queries, keys, chunks, prepare=lambda rank, capture: None):
    """Each rank in a thread; returns every rank's finished s_attn."""
    barrier = threading.Barrier(world, timeout=10)
    deposited = [None] * world
    results = [None] * world

    def sum_over(rank):
        def sum_over_ranks(tensor):
            deposited[rank] = tensor.clone()
            barrier.wait()
            tensor.copy_(sum(deposited))
            barrier.wait()
        return sum_over_ranks

    def rank_main(rank):
        capture = make_capture(H_Q // world, H_KV // world, sum_over(rank))
        prepare(rank, capture)
        prefill(capture, rank_shard(queries, rank, H_Q // world), rank_shard(keys, rank, H_KV // world), chunks)
        results[rank] = capture.finish("req")

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads), "a rank is stuck in the sum over ranks"
    return results


@pytest.fixture
def qk():
    generator = torch.Generator().manual_seed(0)
    queries = {i: torch.randn(PROMPT_LEN, H_Q * D, generator=generator) for i in LAYERS}
    keys = {i: torch.randn(PROMPT_LEN, H_KV * D, generator=generator) for i in LAYERS}
    return queries, keys


@pytest.mark.parametrize("chunks", [(PROMPT_LEN,), (5, 5, 3)], ids=["one-step", "chunked"])
def test_two_ranks_summed_equal_one_rank_with_every_head(qk, chunks):
    queries, keys = qk
    whole = make_capture(H_Q, H_KV)
    prefill(whole, queries, keys, chunks)
    expected = whole.finish("req")[0]

    results = run_ranks(2, queries, keys, chunks)

    for scores in results:
        torch.testing.assert_close(scores[0], expected, rtol=1e-6, atol=1e-7)
    # Either rank's own heads give another s_attn: the sum is what makes it right.
    alone = make_capture(H_Q // 2, H_KV // 2)
    prefill(alone, rank_shard(queries, 0, H_Q // 2), rank_shard(keys, 0, H_KV // 2), chunks)
    assert not torch.allclose(alone.finish("req")[0], expected, rtol=1e-3, atol=1e-4)


def test_a_rank_that_fails_still_joins_the_sum_and_the_video_has_no_s_attn(qk):
    def break_rank_one(rank, capture):
        if rank == 1:
            accumulator = capture._requests["req"].videos[0].accumulator
            accumulator.layer_totals = lambda layers: (_ for _ in ()).throw(RuntimeError("boom"))

    results = run_ranks(2, *qk, chunks=(PROMPT_LEN,), prepare=break_rank_one)

    assert results == [[None], [None]]


def test_without_ranks_nothing_is_summed(qk):
    capture = make_capture(H_Q, H_KV)
    assert not capture.sums_over_ranks
    prefill(capture, *qk, chunks=(PROMPT_LEN,))
    assert capture.is_tracking("req")  # finished lazily by the proposer, as before
    assert capture.finish("req")[0] is not None
