"""s_attn is built only from a capture that saw every scheduled row of every layer, and
equals the torch oracle on every chunking of a prompt.

Pure logic with stand-ins for vLLM's attention layers (a paged KV cache,
tests/vllm/paged_attention_stand_in.py), runner and scheduler output: a layer call
that never happens (on CUDA, a step replayed from a full CUDA graph does not call
``impl.forward``) must make the capture incomplete, never a score over a subset of
the rows.
"""

from __future__ import annotations

import functools
import types

import pytest
import torch

from paged_attention_stand_in import PagedImpl, run_layer

from hippo_vllm.core import attention_scores
from hippo_vllm.vllm.target.attention_capture import PATCH_TARGET, TargetAttentionCapture
from hippo_vllm.vllm.patching import PatchConflict, applied_patches
from hippo_vllm.vllm.target.step_records import batch_rows, step_start

HEADS, KV_HEADS, HEAD_SIZE = 2, 1, 4
PROMPT_LEN, VIDEO = 12, (2, 4)  # a video at rows 2..5, text after it
REQ = "req-0"


def paged_impl(seed: int = 0, num_heads: int = HEADS, num_kv_heads: int = KV_HEADS, prompt_len: int = PROMPT_LEN):
    return PagedImpl(num_heads, num_kv_heads, HEAD_SIZE, 0.5, prompt_len, torch.Generator().manual_seed(seed))


def make_capture(num_layers: int = 2):
    layers = {i: types.SimpleNamespace(impl=paged_impl(i)) for i in range(num_layers)}
    capture = TargetAttentionCapture(layers, tuple(range(num_layers)))
    capture.track(REQ, PROMPT_LEN, [VIDEO], [VIDEO])
    return capture, layers


def run_step(capture, layers, start: int, n: int, skip_layers=(), new: bool = False, rows=None,
             prompt_len: int = PROMPT_LEN, vllm_layer=None) -> None:
    """One target step scheduling prompt rows [start, start + n) of the request (``rows``:
    per layer the whole prompt's (query, key) rows, else random ones; ``vllm_layer``: the
    attention layer impl.forward gets, with its scales)."""
    new_reqs = [types.SimpleNamespace(req_id=REQ, num_computed_tokens=start, prompt_token_ids=[0] * prompt_len,
                                      mm_features=[])] if new else []
    cached = types.SimpleNamespace(req_ids=[] if new else [REQ], num_computed_tokens=[] if new else [start],
                                   resumed_req_ids=set())
    scheduler_output = types.SimpleNamespace(
        scheduled_new_reqs=new_reqs, scheduled_cached_reqs=cached, num_scheduled_tokens={REQ: n},
        finished_req_ids=set())
    runner = types.SimpleNamespace(
        input_batch=types.SimpleNamespace(req_ids=[REQ]),
        requests={REQ: types.SimpleNamespace(num_computed_tokens=start)})
    capture.begin_step(step_start(runner, scheduler_output), functools.partial(batch_rows, runner, scheduler_output))
    generator = torch.Generator().manual_seed(start)
    for index, layer in layers.items():
        if rows is None:
            query = torch.randn(n, layer.impl.num_heads * HEAD_SIZE, generator=generator)
            key = torch.randn(n, layer.impl.num_kv_heads * HEAD_SIZE, generator=generator)
        else:
            query, key = rows[index][0][start : start + n], rows[index][1][start : start + n]
        if index not in skip_layers:
            run_layer(layer, query, key, start, vllm_layer)
    capture.end_step()


def test_a_complete_capture_scores_every_video_token():
    capture, layers = make_capture()
    run_step(capture, layers, 0, 7, new=True)
    run_step(capture, layers, 7, 5)
    (scores,) = capture.finish(REQ)
    assert scores is not None and scores.shape == (VIDEO[1],)


@pytest.mark.parametrize("skipped_step", [0, 1], ids=["keys-step", "queries-step"])
def test_a_layer_that_missed_a_step_makes_the_capture_incomplete(skipped_step):
    # Step 0 holds the video's keys and some text queries, step 1 the rest of the
    # queries; layer 1 does not see one of them.
    capture, layers = make_capture()
    run_step(capture, layers, 0, 7, skip_layers=(1,) if skipped_step == 0 else (), new=True)
    run_step(capture, layers, 7, 5, skip_layers=(1,) if skipped_step == 1 else ())
    assert capture.finish(REQ) == [None]


def test_a_step_no_layer_saw_makes_the_capture_incomplete():
    # A prefill chunk replayed from a full CUDA graph: no layer call at all.
    capture, layers = make_capture()
    run_step(capture, layers, 0, 7, new=True)
    run_step(capture, layers, 7, 5, skip_layers=(0, 1))
    assert capture.finish(REQ) == [None]


def test_an_error_while_observing_never_reaches_the_target_forward():
    failures = []
    layers = {0: types.SimpleNamespace(impl=paged_impl())}
    capture = TargetAttentionCapture(layers, (0,), on_failure=lambda *args: failures.append(args))
    capture.track(REQ, PROMPT_LEN, [VIDEO], [VIDEO])
    capture._observe = lambda *args: 1 / 0
    run_step(capture, layers, 0, PROMPT_LEN, new=True)
    assert [(where, type(exc), req_ids) for where, exc, req_ids in failures] == [
        ("target attention capture", ZeroDivisionError, [REQ])]
    assert capture.finish(REQ) == [None]


def test_the_forward_wrap_goes_through_the_patch_helper():
    capture, layers = make_capture(num_layers=1)
    assert PATCH_TARGET in applied_patches()
    with pytest.raises(PatchConflict, match="already replaced by hippo_vllm"):
        TargetAttentionCapture(layers, (0,))  # two wrappers on one layer would both run
    foreign = types.SimpleNamespace(impl=paged_impl())
    foreign.impl.forward = lambda *args: None  # another party's per-instance replacement
    with pytest.raises(PatchConflict, match="already replaced by another party"):
        TargetAttentionCapture({0: foreign}, (0,))


def compositions(total: int):
    """Every way to split a prompt of ``total`` rows into consecutive chunks."""
    if total == 0:
        yield ()
        return
    for first in range(1, total + 1):
        for rest in compositions(total - first):
            yield (first, *rest)


def test_every_chunking_of_a_prompt_gives_the_oracles_s_attn():
    # Two videos with text between and after; GQA 3:1. The keys come back from the paged
    # cache (random non-contiguous blocks, NaN elsewhere), whichever chunk computed them.
    seed = int(torch.randint(0, 2**31 - 1, ()))
    generator = torch.Generator().manual_seed(seed)
    heads, kv_heads, prompt_len, videos = 6, 2, 10, [(1, 3), (5, 2)]
    text = [p for p in range(prompt_len) if not any(o <= p < o + n for o, n in videos)]
    rows = {i: (torch.randn(prompt_len, heads * HEAD_SIZE, generator=generator),
                torch.randn(prompt_len, kv_heads * HEAD_SIZE, generator=generator)) for i in (0, 1)}
    expected = [
        attention_scores(
            [rows[i][0][[p for p in text if p >= o + n]].view(-1, heads, HEAD_SIZE) for i in (0, 1)],
            [rows[i][1][o : o + n].view(-1, kv_heads, HEAD_SIZE) for i in (0, 1)], scale=0.5)
        for o, n in videos
    ]
    chunkings = list(compositions(prompt_len))
    assert len(chunkings) == 2 ** (prompt_len - 1)
    for chunks in chunkings:
        layers = {i: types.SimpleNamespace(impl=paged_impl(seed + i, heads, kv_heads, prompt_len)) for i in (0, 1)}
        capture = TargetAttentionCapture(layers, (0, 1))
        capture.track(REQ, prompt_len, videos, videos)
        start = 0
        for n in chunks:
            run_step(capture, layers, start, n, new=start == 0, rows=rows, prompt_len=prompt_len)
            start += n
        scores = capture.finish(REQ)
        for got, want in zip(scores, expected, strict=True):
            assert got is not None, (chunks, seed)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=lambda m: f"{chunks}, seed {seed}: {m}")


def test_an_fp8_query_is_scored_at_the_models_temperature():
    # With an fp8 KV cache vLLM 0.33 hands impl.forward the query as fp8(query / q_scale);
    # s_attn must come from query itself, not from the quantised values.
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    q_scale = 0.05
    layers = {0: types.SimpleNamespace(impl=paged_impl())}
    capture = TargetAttentionCapture(layers, (0,))
    capture.track(REQ, PROMPT_LEN, [VIDEO], [VIDEO])
    query = torch.randn(PROMPT_LEN, HEADS, HEAD_SIZE, generator=generator)
    key = torch.randn(PROMPT_LEN, KV_HEADS, HEAD_SIZE, generator=generator)
    quantised = (query / q_scale).to(torch.float8_e4m3fn)
    layer = types.SimpleNamespace(_q_scale=torch.tensor(q_scale), _q_scale_float=q_scale)
    run_step(capture, layers, 0, PROMPT_LEN, new=True, rows={0: (quantised.view(PROMPT_LEN, -1),
                                                                key.view(PROMPT_LEN, -1))}, vllm_layer=layer)
    (scores,) = capture.finish(REQ)
    text = slice(VIDEO[0] + VIDEO[1], PROMPT_LEN)
    video = slice(VIDEO[0], VIDEO[0] + VIDEO[1])
    model = attention_scores(quantised[text].float() * q_scale, key[video], scale=0.5)
    torch.testing.assert_close(scores, model, rtol=1e-5, atol=1e-6)
    raw = attention_scores(quantised[text].float(), key[video], scale=0.5)  # the wrong temperature
    assert not torch.allclose(scores, raw, rtol=1e-2, atol=1e-3)
