"""The draft on a GPU: its measured working memory, and decode steps replayed from CUDA graphs.

GPU only (gpu test profile, one GPU; `make gpu-check` runs it). A DraftWorker of
the tiny draft next to an in-process engine of the tiny target:

- before its KV cache exists, one dummy encode of the target's largest item and
  one prefill piece measure a working memory above zero, and leave no cache;
- a worker with decode graphs captures one per bucket; a decode batch of each
  size (padded to its bucket) gives the eager forward's logits, and a mixed
  batch still runs eagerly. Step times of both are
  printed (measured, not asserted).
"""

from __future__ import annotations

import time

import pytest
import torch
from engine_utils import PROFILE, engine

from hippo_vllm.config import HippoConfig
from hippo_vllm.vllm.draft.decode_graphs import decode_buckets
from hippo_vllm.vllm.draft.engine import DraftInput
from hippo_vllm.vllm.draft.worker import DraftWorker
from hippo_vllm.vllm.seam.model_runner import encoder_profile_batch

pytestmark = [
    pytest.mark.engine,
    pytest.mark.skipif(PROFILE != "gpu" or not torch.cuda.is_available(),
                       reason="the draft's CUDA memory and graphs: run by make gpu-check"),
]

MAX_BATCH = 6  # buckets 1, 2, 4, 6
PROMPT = 40


@pytest.fixture(scope="module")
def target(tiny):
    with engine(tiny.target, max_num_seqs=MAX_BATCH) as llm:
        yield llm


def hippo(tiny) -> HippoConfig:
    return HippoConfig(model=str(tiny.draft), num_speculative_tokens=3)


def test_the_drafts_working_memory_is_measured_before_its_cache(target, tiny):
    worker = DraftWorker(target.llm_engine.vllm_config, hippo(tiny))
    batch = encoder_profile_batch(target.llm_engine.model_executor.driver_worker.worker.model_runner)
    headroom = worker.measure_headroom(batch)
    print(f"draft working memory: {headroom / 2**20:.1f} MiB (prefill piece {worker.headroom_tokens} rows)")
    assert headroom > 0 and worker.engine.kv is None
    worker.allocate_kv_cache(16)
    assert worker.engine.num_free_blocks == 16


def _prefill(draft, req_ids):
    for i, req_id in enumerate(req_ids):
        ids = (torch.arange(PROMPT) * (i + 3)) % draft.proposable_ids
        draft.run([DraftInput(req_id, torch.arange(PROMPT).expand(3, -1).clone(), token_ids=ids)])


def _decode(draft, req_ids, tokens):
    return draft.run([DraftInput(r, torch.full((3, 1), PROMPT), token_ids=torch.tensor([t]))
                      for r, t in zip(req_ids, tokens)])


def _timed(draft, req_ids, tokens, repeats=20):
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        _decode(draft, req_ids, tokens)
        for r in req_ids:
            draft.truncate(r, PROMPT)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def test_decode_steps_replayed_from_graphs_equal_the_eager_forward(target, tiny):
    worker = DraftWorker(target.llm_engine.vllm_config, hippo(tiny), decode_graphs=True)
    worker.allocate_kv_cache(64)
    draft = worker.engine
    assert draft.decode_graphs is not None and draft.decode_graphs.buckets == decode_buckets(MAX_BATCH)
    for num in (1, 3, MAX_BATCH):
        req_ids = [f"r{num}-{i}" for i in range(num)]
        _prefill(draft, req_ids)
        tokens = [7 + i for i in range(num)]
        replayed = _decode(draft, req_ids, tokens).clone()
        for r in req_ids:
            draft.truncate(r, PROMPT)
        graphs, draft.decode_graphs = draft.decode_graphs, None
        try:
            eager = _decode(draft, req_ids, tokens)
            eager_seconds = _timed(draft, req_ids, tokens)
        finally:
            draft.decode_graphs = graphs
        assert torch.equal(replayed.argmax(-1), eager.argmax(-1))
        torch.testing.assert_close(replayed, eager, atol=2e-2, rtol=2e-2)
        for r in req_ids:
            draft.truncate(r, PROMPT)
        graph_seconds = _timed(draft, req_ids, tokens)
        print(f"draft decode step, batch {num}: eager {eager_seconds * 1e3:.2f} ms, "
              f"graph {graph_seconds * 1e3:.2f} ms")
        for r in req_ids:
            draft.free(r)
    # A prefill and a decode together run eagerly.
    _prefill(draft, ["a"])
    logits = draft.run([DraftInput("a", torch.full((3, 1), PROMPT), token_ids=torch.tensor([5])),
                        DraftInput("b", torch.arange(4).expand(3, -1).clone(), token_ids=torch.arange(4))])
    assert logits.shape[0] == 2
