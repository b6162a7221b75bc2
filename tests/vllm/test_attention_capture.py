"""s_attn is built only from a capture that saw every scheduled row of every layer.

Pure logic with stand-ins for vLLM's attention layers, runner and scheduler output:
a layer call that never happens (on CUDA, a step replayed from a full CUDA graph
does not call ``impl.forward``) must make the capture incomplete, never a score
over a subset of the rows.
"""

from __future__ import annotations

import functools
import types

import pytest
import torch

from hippo_vllm.vllm.target.attention_capture import PATCH_TARGET, TargetAttentionCapture
from hippo_vllm.vllm.patching import PatchConflict, applied_patches
from hippo_vllm.vllm.target.step_records import batch_rows, step_start

HEADS, KV_HEADS, HEAD_SIZE = 2, 1, 4
PROMPT_LEN, VIDEO = 12, (2, 4)  # a video at rows 2..5, text after it
REQ = "req-0"


class FakeImpl:
    num_heads, num_kv_heads, head_size, scale = HEADS, KV_HEADS, HEAD_SIZE, 0.5

    def forward(self, layer, query, key, value, kv_cache, attn_metadata):
        return query


def make_capture(num_layers: int = 2):
    layers = {i: types.SimpleNamespace(impl=FakeImpl()) for i in range(num_layers)}
    capture = TargetAttentionCapture(layers, tuple(range(num_layers)))
    capture.track(REQ, PROMPT_LEN, [VIDEO], [VIDEO])
    return capture, layers


def run_step(capture, layers, start: int, n: int, skip_layers=(), new: bool = False) -> None:
    """One target step scheduling prompt rows [start, start + n) of the request."""
    new_reqs = [types.SimpleNamespace(req_id=REQ, num_computed_tokens=start, prompt_token_ids=[0] * PROMPT_LEN,
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
    query = torch.randn(n, HEADS * HEAD_SIZE, generator=generator)
    key = torch.randn(n, KV_HEADS * HEAD_SIZE, generator=generator)
    for index, layer in layers.items():
        if index not in skip_layers:
            layer.impl.forward(None, query, key, None, None, object())
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
    layers = {0: types.SimpleNamespace(impl=FakeImpl())}
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
    foreign = types.SimpleNamespace(impl=FakeImpl())
    foreign.impl.forward = lambda *args: None  # another party's per-instance replacement
    with pytest.raises(PatchConflict, match="already replaced by another party"):
        TargetAttentionCapture({0: foreign}, (0,))
