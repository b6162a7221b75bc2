"""vLLM's runner and scheduler output read into plain step records.

Pure logic with stand-ins shaped like vLLM 0.32's ``CachedRequestState``,
``InputBatch`` and ``SchedulerOutput`` (only the fields step_records reads).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hippo_vllm.vllm.model_families import LLAVA_ONEVISION, QWEN2_5_VL
from hippo_vllm.vllm.target.step_records import (
    after_sampling,
    batch_rows,
    before_forward,
    chunk_budget,
    draft_prompt,
    serial_budget,
    step_start,
)

MAX_MODEL_LEN = 64


def request(prompt_len: int, outputs: list[int], max_tokens: int | None = None, computed: int = 0, **extra):
    state = SimpleNamespace(
        prompt_token_ids=list(range(100, 100 + prompt_len)),
        num_prompt_tokens=prompt_len,
        output_token_ids=list(outputs),
        sampling_params=SimpleNamespace(max_tokens=max_tokens),
        num_computed_tokens=computed,
        mm_features=[],
        mrope_positions=None,
        mrope_position_delta=None,
        **extra,
    )
    state.num_tokens = prompt_len + len(outputs)
    return state


def scheduler_output(scheduled: dict[str, int], spec=None, new=(), resumed=(), cached=(), finished=(), **extra):
    return SimpleNamespace(
        num_scheduled_tokens=scheduled,
        scheduled_spec_decode_tokens=spec or {},
        scheduled_new_reqs=list(new),
        scheduled_cached_reqs=SimpleNamespace(
            req_ids=[r for r, _ in cached], num_computed_tokens=[c for _, c in cached], resumed_req_ids=set(resumed)
        ),
        finished_req_ids=set(finished),
        **extra,
    )


@pytest.mark.parametrize(
    "k, num_tokens, num_outputs, max_tokens, expected",
    [
        (3, 20, 5, None, 3),  # nothing near a limit
        (3, 62, 5, None, 2),  # two tokens left before max_model_len
        (3, 20, 5, 8, 2),  # the next step commits one token of the target's own too
        (3, 20, 5, 6, 0),  # the next step's own token is the last
        (3, 20, 7, 6, -2),  # beyond: the request is released
    ],
)
def test_serial_budget(k, num_tokens, num_outputs, max_tokens, expected):
    assert serial_budget(k, MAX_MODEL_LEN, num_tokens, num_outputs, max_tokens) == expected


@pytest.mark.parametrize(
    "num_tokens, num_outputs, max_tokens, expected",
    [
        (20, 5, 8, 3),  # near max_tokens: k all the same, for a uniform 1+k step
        (20, 5, 6, 3),
        (62, 5, None, 2),  # max_model_len still cuts: no KV slots past it
        (62, 5, 8, 2),
    ],
)
def test_a_padded_serial_budget_ignores_max_tokens_but_not_max_model_len(num_tokens, num_outputs, max_tokens,
                                                                         expected):
    assert serial_budget(3, MAX_MODEL_LEN, num_tokens, num_outputs, max_tokens, pad_to_k=True) == expected


@pytest.mark.parametrize(
    "gamma, num_tokens, num_outputs, spec_len, max_tokens, expected",
    [
        (4, 20, 5, 3, None, 4),
        (4, 58, 5, 3, None, 2),  # 58 + 3 spec + 1 own = 62 committed at most: two more fit
        (4, 20, 5, 3, 11, 2),  # 5 + 3 + 1 = 9 of 11 outputs after this step
        (4, 20, 5, 0, 6, 0),  # a conservative step commits the last token
    ],
)
def test_chunk_budget_counts_the_spec_tokens_under_verification(
    gamma, num_tokens, num_outputs, spec_len, max_tokens, expected
):
    assert chunk_budget(gamma, MAX_MODEL_LEN, num_tokens, num_outputs, spec_len, max_tokens) == expected


def test_after_sampling_follows_the_batch_order_with_committed_outputs_and_budgets():
    a = request(4, [1, 2], max_tokens=4)
    b = request(3, [7, 8, 9])
    token_ids = np.zeros((2, 16), dtype=np.int64)
    token_ids[0, :7] = [100, 101, 102, 103, 1, 2, 3]  # a sampled 3 this step
    token_ids[1, :8] = [100, 101, 102, 7, 8, 9, 5, 6]  # b accepted 5 and sampled 6
    a.output_token_ids.append(3)
    b.output_token_ids += [5, 6]
    runner = SimpleNamespace(
        requests={"a": a, "b": b},
        input_batch=SimpleNamespace(req_ids=["b", "a"], num_tokens_no_spec=np.array([8, 7]),
                                    token_ids_cpu=token_ids[[1, 0]]),
    )
    so = scheduler_output({"a": 1, "b": 3}, spec={"b": [5, 4]})
    records = after_sampling(runner, so, [[5, 6], [3]], 3, MAX_MODEL_LEN, with_outputs=True)
    assert [(r.req_id, r.index) for r in records] == [("b", 0), ("a", 1)]
    rb, ra = records
    assert rb.outputs == [7, 8, 9, 5, 6] and rb.spec == [5, 4] and rb.sampled == [5, 6] and rb.budget == 3
    assert ra.outputs == [1, 2, 3] and ra.spec == [] and ra.sampled == [3]
    assert ra.budget == 0  # 3 of 4 outputs: the next step's own token is the last
    assert ra.max_tokens == 4 and rb.max_tokens is None
    without = after_sampling(runner, so, [[5, 6], [3]], 3, MAX_MODEL_LEN, with_outputs=False)
    assert [r.outputs for r in without] == [None, None]
    assert [r.budget for r in without] == [r.budget for r in records]


def test_before_forward_leaves_out_new_and_resumed_requests():
    runner = SimpleNamespace(requests={"run": request(10, [1, 2, 3], max_tokens=9), "back": request(10, [4])})
    so = scheduler_output({"new": 30, "run": 3, "back": 11}, spec={"run": [4, 5]}, resumed=["back"])
    (record,) = before_forward(runner, so, 4, MAX_MODEL_LEN)
    assert record.req_id == "run" and record.index == -1
    assert record.outputs == [1, 2, 3] and record.spec == [4, 5]
    assert record.budget == 3  # 3 + 2 spec + 1 own = 6 of 9 outputs after this step


def test_step_start_names_the_requests_and_where_their_rows_start():
    video = SimpleNamespace(modality="video", mm_position=SimpleNamespace(offset=3, length=6))
    image = SimpleNamespace(modality="image", mm_position=SimpleNamespace(offset=0, length=2))
    new = SimpleNamespace(req_id="new", prompt_token_ids=[1] * 12, mm_features=[image, video], num_computed_tokens=4)
    embeds = SimpleNamespace(req_id="embeds", prompt_token_ids=None, mm_features=[], num_computed_tokens=0)
    runner = SimpleNamespace(requests={"back": request(9, [5])})
    so = scheduler_output(
        {"new": 8, "embeds": 5, "back": 10, "run": 1}, new=[new, embeds], resumed=["back"],
        cached=[("back", 0), ("run", 20)], finished=["gone"], preempted_req_ids={"out"},
    )
    step = step_start(runner, so)
    assert step.finished == ["gone"] and step.preempted == ["out"]
    assert step.new == ["new", "embeds"] and step.resumed == ["back"]
    assert [(p.req_id, p.prompt_len, p.video_spans, p.mm_ranges) for p in step.starting] == [
        ("new", 12, [(3, 6)], [(0, 2), (3, 6)]), ("embeds", None, [], []), ("back", 9, [], [])
    ]
    assert step.computed_before == {"new": 4, "embeds": 0, "back": 0, "run": 20}
    assert list(step.num_scheduled_tokens) == ["new", "embeds", "back", "run"]
    # New multimodal requests arrive with their items (the draft encodes them now); not one
    # that ends within two tokens, which is never drafted for.
    assert step.arriving == [("new", [image, video])]
    short = SimpleNamespace(req_id="short", prompt_token_ids=[1] * 12, mm_features=[video], num_computed_tokens=0,
                            sampling_params=SimpleNamespace(max_tokens=2))
    longer = SimpleNamespace(**{**vars(short), "req_id": "longer", "sampling_params": SimpleNamespace(max_tokens=3)})
    so.scheduled_new_reqs = [short, longer]
    assert step_start(runner, so).arriving == [("longer", [video])]
    # vLLM versions without preempted_req_ids
    del so.preempted_req_ids
    assert step_start(runner, so).preempted == []


def test_batch_rows_follow_the_persistent_batch_order():
    runner = SimpleNamespace(
        input_batch=SimpleNamespace(req_ids=["x", "y", "z"]),
        requests={"x": request(4, [], computed=0), "y": request(4, [], computed=2), "z": request(4, [], computed=3)},
    )
    so = scheduler_output({"z": 1, "x": 4, "y": 2})
    assert batch_rows(runner, so, {"y", "z"}) == {"y": (1, 4, 2, 2), "z": (2, 6, 3, 1)}


def test_draft_prompt_copies_only_the_prompt_positions():
    positions = torch.arange(3 * 20, dtype=torch.int32).view(3, 20)
    state = request(6, [1, 2])
    state.mrope_positions, state.mrope_position_delta = positions, -3
    prompt = draft_prompt(SimpleNamespace(requests={"r": state}), "r", QWEN2_5_VL)
    assert prompt.prompt_token_ids == state.prompt_token_ids and prompt.mrope_delta == -3
    assert prompt.positions.dtype == torch.long and torch.equal(prompt.positions, positions[:, :6].long())
    assert prompt.positions.untyped_storage().nbytes() == 3 * 6 * 8  # a pickled prompt carries only its rows
    # A family of 1-D positions (the runner computes no M-RoPE ones): position i at row i.
    state.mrope_positions, state.mrope_position_delta = None, None
    flat = draft_prompt(SimpleNamespace(requests={"r": state}), "r", LLAVA_ONEVISION)
    assert torch.equal(flat.positions, torch.arange(6).expand(3, -1)) and flat.mrope_delta == 0
