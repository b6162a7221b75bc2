"""The draft's side: one StepWork in, one StepResult out, never an exception.

A real DraftWorker (the tiny draft) next to an in-process engine of the tiny
target, whose runner gives the requests' DraftPrompts (``step_records.draft_prompt``,
read right after the target's prefill, as the proposer reads them). Faults are
injected into the draft engine to check how each maps into the result.
"""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch
from engine_utils import engine, greedy, text_request, video_request

from hippo_vllm.config import HippoConfig
from hippo_vllm.core.adaptive_length import MIN_TOKENS, ChunkLength
from hippo_vllm.vllm.placements.in_process import InProcessDraft
from hippo_vllm.vllm.draft.engine import DraftCapacityError
from hippo_vllm.vllm.protocol import ChunkOrder, Encode, Prefill, Release, StepWork
from hippo_vllm.vllm.draft.recent_encodes import RecentEncodes
from hippo_vllm.vllm.draft.worker import DraftWorker
from hippo_vllm.vllm.model_families import QWEN2_5_VL
from hippo_vllm.vllm.target.step_records import draft_prompt

pytestmark = pytest.mark.engine

K = 3


@pytest.fixture(scope="module")
def target(tiny, tiny_tokenizer):
    """The target's engine (kept running: the draft lives in its process) and two DraftPrompts."""
    requests = [video_request(tiny_tokenizer, "Describe this video.", tiny.synthetic_videos[0]),
                text_request(tiny_tokenizer, "Which colours are warm?")]
    with engine(tiny.target) as llm:
        runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
        prompts, original = {}, runner.execute_model

        def execute_model(*args, **kwargs):
            out = original(*args, **kwargs)
            for req_id in runner.requests:
                prompts.setdefault(req_id, draft_prompt(runner, req_id, QWEN2_5_VL))
            return out

        runner.execute_model = execute_model
        try:
            outputs = llm.generate(requests, greedy(4), use_tqdm=False)
        finally:
            runner.execute_model = original
        by_ids = {tuple(p.prompt_token_ids): p for p in prompts.values()}
        video, text = (by_ids[tuple(o.prompt_token_ids)] for o in outputs)
        yield llm, {"video": video, "text": text}


@pytest.fixture(scope="module")
def worker(target, tiny):
    llm, _ = target
    hippo = HippoConfig(model=str(tiny.draft), num_speculative_tokens=K)
    draft = DraftWorker(llm.llm_engine.vllm_config, hippo)
    draft.allocate_kv_cache(64)
    return draft


@pytest.fixture
def draft(worker):
    """The shared worker, empty for each test (no video encoded recently either)."""
    worker.recent_encodes = RecentEncodes()
    yield worker
    held = set(worker._prompts) | set(worker._states) | set(worker._orders) | set(worker._encoded)
    worker.handle(StepWork(-1, releases=[Release(r, finished=True) for r in held]))
    assert worker.engine.num_requests == 0 and worker.num_views == 0


def fail_forwards_with(monkeypatch, engine, req_id, message):
    """Every draft forward that includes ``req_id`` raises RuntimeError(message)."""
    original = engine._forward_rows  # every forward of the draft, prefills and decode steps alike

    def forward(req_ids, *args, **kwargs):
        if req_id in req_ids:
            raise RuntimeError(message)
        return original(req_ids, *args, **kwargs)

    monkeypatch.setattr(engine, "_forward_rows", forward)


def prefill(req_id, prompt, attention=None):
    return Prefill(req_id, prompt, attention)


def test_prefill_and_chunks_with_deltas_draft_greedily(draft, target):
    prompts = target[1]
    backend = InProcessDraft(draft)
    work = StepWork(0, prefills=[prefill("v", prompts["video"]), prefill("t", prompts["text"])],
                    chunks=[ChunkOrder("v", 0, [11], K), ChunkOrder("t", 0, [12], K)])
    first = backend.submit(work).result(timeout=None)
    assert first.seq == 0 and first.failures == [] and first.no_room == [] and first.step_failure is None
    assert sorted(r.req_id for r in first.views) == ["t", "v"]
    video_view = next(r for r in first.views if r.req_id == "v")
    assert 0 < video_view.video_tokens_seen < video_view.video_tokens  # pruned, without s_attn
    assert not video_view.attention_used
    assert {r: len(c) for r, c in first.chunks.items()} == {"v": K, "t": K}
    # Only the change travels: [11] kept, two drafted tokens added. Drafting on
    # from them must give the chunk's third token again (the draft is greedy).
    chunk = first.chunks["v"]
    second = draft.handle(StepWork(1, chunks=[ChunkOrder("v", 1, chunk[:2], 1)]))
    assert second.chunks == {"v": chunk[2:3]}
    assert pickle.loads(pickle.dumps(work)).prefills[0].prompt.prompt_token_ids == prompts["video"].prompt_token_ids
    assert pickle.loads(pickle.dumps(first)).chunks == first.chunks


def test_a_chunk_whose_steps_find_no_room_together_drafts_them_one_at_a_time(draft, target, monkeypatch):
    """A chunk's steps take their KV rows at once; where those do not all fit, they go one at a
    time (the same greedy tokens) and the chunk ends where the room does."""
    prompts = target[1]
    orders = [ChunkOrder("v", 0, [11], K), ChunkOrder("t", 0, [12], K)]
    whole = draft.handle(StepWork(0, prefills=[prefill("v", prompts["video"]), prefill("t", prompts["text"])],
                                  chunks=orders)).chunks
    assert {r: len(c) for r, c in whole.items()} == {"v": K, "t": K}
    reserve, rows, room = draft.engine.kv.reserve, [], [K]  # room: forwards that still find their rows

    def nearly_full(new_lengths):  # room for one row per request and forward, `room` times more
        grows = max(n - draft.engine.length(r) for r, n in new_lengths.items())
        rows.append(grows)
        if grows > 1 or not room[0]:
            raise DraftCapacityError("injected: no free blocks")
        room[0] -= 1
        return reserve(new_lengths)

    monkeypatch.setattr(draft.engine.kv, "reserve", nearly_full)
    result = draft.handle(StepWork(1, chunks=orders))
    assert result.chunks == whole and result.no_room == [] and result.failures == []
    assert rows == [K, *[1] * K]  # every step at once, then the first step and each later one alone
    rows.clear()
    room[0] = 2  # the first step and one more
    result = draft.handle(StepWork(2, chunks=orders))
    assert result.chunks == {r: c[:2] for r, c in whole.items()} and result.no_room == []
    assert rows == [K, 1, 1, 1]


def test_a_time_budget_sets_how_many_tokens_the_chunks_hold(draft, target):
    """PEARL's adaptive length: as many tokens as fit in the step's time, 2 to the order's budget."""
    prompts = target[1]
    draft.chunk_length = ChunkLength()  # nothing measured yet

    def step(seq, budgets, time_budget_s, prefills=()):
        orders = [ChunkOrder(req_id, 0 if prefills else 1, [11] if prefills else [], budget)
                  for req_id, budget in budgets.items()]
        return draft.handle(StepWork(seq, prefills=list(prefills), chunks=orders, time_budget_s=time_budget_s))

    first = step(0, {"v": 6, "t": 6}, 0.0, [prefill("v", prompts["video"]), prefill("t", prompts["text"])])
    assert {r: len(c) for r, c in first.chunks.items()} == {"v": 6, "t": 6}  # no time per token known yet
    # No time left: the shortest chunk, the same greedy tokens.
    assert step(1, {"v": 6, "t": 6}, 0.0).chunks == {r: c[:MIN_TOKENS] for r, c in first.chunks.items()}
    # An hour: each order's budget.
    assert step(2, {"v": 6, "t": 3}, 3600.0).chunks == {"v": first.chunks["v"], "t": first.chunks["t"][:3]}
    assert step(3, {"v": 6, "t": 6}, None).chunks == first.chunks  # no deadline: the budgets


def test_a_released_request_is_prefilled_again_from_its_kept_view_and_prompt(draft, target):
    prompts = target[1]
    first = draft.handle(StepWork(0, prefills=[prefill("v", prompts["video"])], chunks=[ChunkOrder("v", 0, [11], K)]))
    used = draft.engine.num_used_blocks
    draft.handle(StepWork(1, releases=[Release("v", finished=False)]))
    assert draft.engine.num_requests == 0 and draft.num_views == 1 and draft.num_prompts == 1
    again = draft.handle(StepWork(2, prefills=[prefill("v", None)], chunks=[ChunkOrder("v", 0, [11], K)]))
    assert again.views == [] and again.failures == [] and again.chunks == first.chunks
    assert (first.encodes, again.encodes) == (1, 0)  # its kept rows, not its video encoded again
    assert draft.engine.num_used_blocks == used
    draft.handle(StepWork(3, releases=[Release("v", finished=True)]))
    assert draft.num_prompts == draft.num_views == draft.num_draft_requests == 0


def test_a_video_encoded_on_arrival_is_not_encoded_again_by_its_prefill(draft, target):
    prompts = target[1]
    video = prompts["video"]
    arrived = draft.handle(StepWork(0, encodes=[Encode("v", video.mm_features)]))
    assert arrived.encodes == 1 and arrived.views == [] and arrived.failures == []
    again = draft.handle(StepWork(1, encodes=[Encode("v", video.mm_features)]))  # sent twice: kept once
    prefilled = draft.handle(StepWork(2, prefills=[prefill("v", video)], chunks=[ChunkOrder("v", 0, [11], K)]))
    assert again.encodes == 0 and prefilled.encodes == 0 and prefilled.failures == []
    assert [r.req_id for r in prefilled.views] == ["v"] and len(prefilled.chunks["v"]) == K
    # The same chunk as a request encoded by its prefill: the encode on arrival changes nothing drafted.
    draft.recent_encodes = RecentEncodes()
    alone = draft.handle(StepWork(3, prefills=[prefill("w", video)], chunks=[ChunkOrder("w", 0, [11], K)]))
    assert alone.encodes == 1 and alone.chunks["w"] == prefilled.chunks["v"]
    # An encode whose request ends before its prefill is dropped with the release.
    draft.handle(StepWork(4, encodes=[Encode("gone", video.mm_features)]))
    draft.handle(StepWork(5, releases=[Release("gone", finished=True)]))
    assert "gone" not in draft._encoded


def test_items_are_encoded_together_within_the_measured_budget_and_equal_alone(draft, target, monkeypatch):
    import torch

    engine, (item,) = draft.engine, target[1]["video"].mm_features
    calls, embed = [], engine.model.embed_multimodal
    monkeypatch.setattr(engine.model, "embed_multimodal", lambda **batch: calls.append(batch) or embed(**batch))
    alone = engine.embed_multimodal([item])
    calls.clear()
    monkeypatch.setattr(engine, "encode_batch_rows", 2 * item.mm_position.length)
    together = engine.embed_multimodal([item, item, item])
    assert len(calls) == 2 and len(together) == 3  # two items fit the budget, the third goes alone
    for embeds in together:
        torch.testing.assert_close(embeds, alone[0])
    # Two prefills of new requests in one step: their videos go through one encoder call,
    # a video two of them carry only once.
    calls.clear()
    video = target[1]["video"]
    other = other_video(video)
    result = draft.handle(StepWork(0, prefills=[prefill("a", video), prefill("b", other), prefill("c", video)]))
    assert len(calls) == 1 and result.encodes == 2 and result.failures == []
    assert sorted(r.req_id for r in result.views) == ["a", "b", "c"]


def test_a_prompt_seen_again_reuses_its_view_and_rows_without_encoding(draft, target):
    prompts = target[1]
    video = prompts["video"]
    first = draft.handle(StepWork(0, prefills=[prefill("a", video)], chunks=[ChunkOrder("a", 0, [11], K)]))
    draft.handle(StepWork(1, releases=[Release("a", finished=True)]))
    # vLLM's prefix cache served the prompt: the target's attention to the video is missing.
    hit = draft.handle(StepWork(2, prefills=[prefill("b", video, attention=[None])],
                                chunks=[ChunkOrder("b", 0, [11], K)]))
    assert (first.encodes, hit.encodes) == (1, 0)
    assert hit.views[0].keep_rows.tolist() == first.views[0].keep_rows.tolist()
    assert hit.chunks["b"] == first.chunks["a"]


def other_video(prompt):
    """The prompt with its video as another item (same pixels, another identifier)."""
    features = [dataclasses.replace(f, identifier=f.identifier + "-other") for f in prompt.mm_features]
    return dataclasses.replace(prompt, mm_features=features)


def test_a_new_question_about_a_recent_video_builds_its_view_without_encoding(draft, target):
    video = target[1]["video"]
    first = draft.handle(StepWork(0, prefills=[prefill("a", video)], chunks=[ChunkOrder("a", 0, [11], K)]))
    draft.handle(StepWork(1, releases=[Release("a", finished=True)]))
    assert len(draft.recent_encodes) == 1
    # The same video in a new prompt whose s_attn was captured: a view of its own, the
    # draft encoder's output reused (as vLLM reuses the target encoder's).
    attention = [torch.linspace(0.0, 1.0, first.views[0].video_tokens)]
    follow_up = draft.handle(StepWork(2, prefills=[prefill("b", video, attention=attention)],
                                      chunks=[ChunkOrder("b", 0, [11], K)]))
    assert (first.encodes, follow_up.encodes) == (1, 0) and follow_up.failures == []
    assert follow_up.views[0].attention_used and len(follow_up.chunks["b"]) == K
    # Its rows equal those of an encode from scratch: same chunk as a fresh worker state.
    draft.handle(StepWork(3, releases=[Release("b", finished=True)]))
    draft.recent_encodes = RecentEncodes()
    fresh = draft.handle(StepWork(4, prefills=[prefill("c", video, attention=attention)],
                                  chunks=[ChunkOrder("c", 0, [11], K)]))
    assert fresh.encodes == 1 and fresh.chunks["c"] == follow_up.chunks["b"]
    assert fresh.views[0].keep_rows.tolist() == follow_up.views[0].keep_rows.tolist()


def test_the_views_of_a_step_are_scored_together_equal_alone_and_a_bad_one_is_blamed_alone(draft, target,
                                                                                             monkeypatch):
    from hippo_vllm.vllm.draft import view as view_module

    video = target[1]["video"]
    other = other_video(video)
    tokens = draft.handle(StepWork(0, prefills=[prefill("probe", video)])).views[0].video_tokens
    draft.handle(StepWork(1, releases=[Release("probe", finished=True)]))
    ranks = [torch.linspace(0.0, 1.0, tokens)], [torch.linspace(1.0, 0.0, tokens)]
    asked = [("a", video, ranks[0]), ("b", other, ranks[1]), ("c", video, ranks[1])]
    alone = {}
    for seq, (req_id, prompt, attention) in enumerate(asked, start=2):
        alone[req_id] = draft.handle(StepWork(seq, prefills=[prefill(req_id, prompt, attention)])).views[0]
        draft.handle(StepWork(10 + seq, releases=[Release(req_id, finished=True)]))
    calls, select = [], view_module.select_video_tokens_batch

    def recording_select(*args, **kwargs):
        calls.append(len(kwargs["video_embeds"]))
        return select(*args, **kwargs)

    monkeypatch.setattr(view_module, "select_video_tokens_batch", recording_select)
    result = draft.handle(StepWork(20, prefills=[prefill(r, p, a) for r, p, a in asked]))
    assert calls == [3] and result.failures == []  # one scoring call for the step's three videos
    for view in result.views:
        assert view.keep_rows.tolist() == alone[view.req_id].keep_rows.tolist()
        assert view.video_tokens_seen == alone[view.req_id].video_tokens_seen and view.attention_used
    # One request's s_attn is malformed: the batch fails, each view is built alone, only it is blamed.
    calls.clear()
    bad = [torch.linspace(0.0, 1.0, tokens - 1)]
    result = draft.handle(StepWork(21, prefills=[prefill("d", video, ranks[0]), prefill("e", other, bad)]))
    assert calls == [2, 1, 1] and [(f.req_id, f.where) for f in result.failures] == [("e", "draft prefill")]
    assert [v.req_id for v in result.views] == ["d"] and "d" in draft.views and "e" not in draft.views


def test_the_rows_of_a_steps_new_views_are_embedded_together_equal_alone_and_a_bad_one_is_blamed_alone(
        draft, target, monkeypatch):
    video = target[1]["video"]
    other = other_video(video)
    tokens = draft.handle(StepWork(0, prefills=[prefill("probe", video)])).views[0].video_tokens
    draft.handle(StepWork(1, releases=[Release("probe", finished=True)]))
    ranks = [torch.linspace(0.0, 1.0, tokens)], [torch.linspace(1.0, 0.0, tokens)]
    alone = {}
    for seq, (req_id, prompt, attention) in enumerate([("a", video, ranks[0]), ("b", other, ranks[1])], start=2):
        draft.handle(StepWork(seq, prefills=[prefill(req_id, prompt, attention)]))
        alone[req_id] = draft.views.rows(req_id, draft.engine.device).clone()
        draft.handle(StepWork(10 + seq, releases=[Release(req_id, finished=True)]))
    calls, embed_prompts = [], draft.engine.embed_prompts

    def recording(prompts):
        calls.append(len(prompts))
        if any(f.identifier.endswith("-other-bad") for p in prompts for f in p.mm_features):
            raise RuntimeError("injected embedding failure")
        return embed_prompts(prompts)

    monkeypatch.setattr(draft.engine, "embed_prompts", recording)
    result = draft.handle(StepWork(20, prefills=[prefill("c", video, ranks[0]), prefill("d", other, ranks[1])],
                                   chunks=[ChunkOrder("c", 0, [11], K), ChunkOrder("d", 0, [11], K)]))
    assert calls == [2] and result.failures == [] and sorted(result.chunks) == ["c", "d"]
    for req_id, same in (("c", "a"), ("d", "b")):
        torch.testing.assert_close(draft.views.rows(req_id, draft.engine.device), alone[same], rtol=0, atol=0)
    # One request's rows cannot be embedded: the shared call fails, each embeds alone, only it is blamed.
    calls.clear()
    bad = dataclasses.replace(other, mm_features=[dataclasses.replace(f, identifier=f.identifier + "-bad")
                                                for f in other.mm_features])
    result = draft.handle(StepWork(30, prefills=[prefill("e", video, ranks[0]), prefill("f", bad, ranks[1])],
                                   chunks=[ChunkOrder("e", 0, [11], K)]))
    assert calls == [2, 1, 1] and [(f.req_id, f.where) for f in result.failures] == [("f", "draft prefill")]
    assert list(result.chunks) == ["e"] and draft.engine.length("f") == 0


def test_the_prefills_of_a_step_share_a_forward_and_a_failing_one_is_blamed_alone(draft, target, monkeypatch):
    prompts = target[1]
    forwards, run = [], draft.engine.run

    def recording_run(inputs):
        forwards.append(sorted(i.req_id for i in inputs))
        return run(inputs)

    monkeypatch.setattr(draft.engine, "run", recording_run)
    first = draft.handle(StepWork(0, prefills=[prefill("v", prompts["video"]), prefill("t", prompts["text"])]))
    assert forwards == [["t", "v"]] and first.failures == [] and draft.num_draft_requests == 2
    draft.handle(StepWork(1, releases=[Release("v", finished=False), Release("t", finished=False)]))
    fail_forwards_with(monkeypatch, draft.engine, "v", "injected prefill failure")
    forwards.clear()
    result = draft.handle(StepWork(2, prefills=[prefill("v", None), prefill("t", None)],
                                   chunks=[ChunkOrder("t", 0, [12], K)]))
    assert forwards[:3] == [["t", "v"], ["v"], ["t"]]  # together, then each alone to find the culprit
    assert [(f.req_id, f.where) for f in result.failures] == [("v", "draft prefill")]
    assert list(result.chunks) == ["t"] and draft.engine.length("v") == 0


def test_errors_are_blamed_on_their_request_or_on_the_step(draft, target, monkeypatch):
    prompts = target[1]
    result = draft.handle(StepWork(0, prefills=[prefill("t", prompts["text"]), prefill("lost", None)],
                                   chunks=[ChunkOrder("t", 0, [12], K), ChunkOrder("lost", 0, [1], K),
                                           ChunkOrder("stranger", 0, [1], K)]))
    assert [(f.req_id, f.where) for f in result.failures] == [("lost", "draft prefill"),
                                                               ("stranger", "chunk drafting")]
    assert "has no draft prompt" in result.failures[0].message
    assert "Traceback (most recent call last)" in result.failures[1].traceback
    assert list(result.chunks) == ["t"] and result.step_failure is None
    # An order keeping more than the last one had.
    result = draft.handle(StepWork(1, chunks=[ChunkOrder("t", 5, [1], K)]))
    assert [(f.req_id, f.error_type) for f in result.failures] == [("t", "ValueError")]

    # One request's draft forward fails inside a batch: found by drafting each alone.
    draft.handle(StepWork(2, prefills=[prefill("v", prompts["video"])]))
    fail_forwards_with(monkeypatch, draft.engine, "v", "injected draft failure")
    result = draft.handle(StepWork(3, chunks=[ChunkOrder("t", 0, [12, 13], K), ChunkOrder("v", 0, [11], K)]))
    assert [(f.req_id, f.where, f.message) for f in result.failures] == [
        ("v", "chunk drafting", "injected draft failure")]
    assert list(result.chunks) == ["t"] and len(result.chunks["t"]) == K
    monkeypatch.undo()

    # No room: the prefill pauses (its chunk is not drafted, nor blamed); a batch without room pauses all.
    draft.handle(StepWork(4, releases=[Release("v", finished=False)]))
    monkeypatch.setattr(draft.engine, "has_room_for", lambda n: False)
    result = draft.handle(StepWork(5, prefills=[prefill("v", None)], chunks=[ChunkOrder("v", 0, [11], K)]))
    assert result.no_room == ["v"] and result.failures == [] and result.chunks == {}
    monkeypatch.undo()

    def full(new_lengths):
        raise DraftCapacityError("injected: no free blocks")

    monkeypatch.setattr(draft.engine.kv, "reserve", full)  # where every draft forward takes its KV rows
    result = draft.handle(StepWork(6, chunks=[ChunkOrder("t", 0, [12, 13, 14], K)]))
    assert result.no_room == ["t"] and result.failures == [] and result.chunks == {}
    monkeypatch.undo()

    # Nothing to blame a request for: the step fails, handle still answers.
    def broken_free(req_id):
        raise RuntimeError("injected allocator failure")

    monkeypatch.setattr(draft.engine, "free", broken_free)
    result = draft.handle(StepWork(7, releases=[Release("t", finished=False)], chunks=[ChunkOrder("t", 0, [1], K)]))
    assert result.seq == 7 and result.step_failure is not None
    assert result.step_failure.where == "draft step" and "injected allocator failure" in result.step_failure.traceback


def test_the_draft_measures_its_working_memory_then_warms_up_when_its_cache_is_allocated(target, tiny):
    from hippo_vllm.vllm.seam.model_runner import encoder_profile_batch

    llm, _ = target
    runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
    warm = DraftWorker(llm.llm_engine.vllm_config, HippoConfig(model=str(tiny.draft), num_speculative_tokens=K))
    forwards, run = [], warm.engine.run
    warm.engine.run = lambda inputs: (forwards.append([i.num_rows for i in inputs]), run(inputs))[1]
    encoded, embed = [], warm.engine.model.embed_multimodal
    warm.engine.model.embed_multimodal = lambda **batch: encoded.append(embed(**batch)) or encoded[-1]
    batch = encoder_profile_batch(runner)
    assert batch is not None
    # vLLM's own profiling batch (as many of the largest items as its encoder budget lets one
    # step encode) in one call through the vision tower, and one prefill piece, in a throwaway
    # cache; no allocator statistics on the CPU, so nothing measured.
    assert warm.measure_headroom(batch) == 0
    assert forwards == [[warm.headroom_tokens]] and len(encoded) == 1
    modality = runner.mm_budget.get_modality_with_max_tokens()
    items = runner.mm_budget.mm_max_items_per_batch[modality]
    assert items > 1 and len(encoded[0]) == items
    # Later steps encode their items together up to the rows measured here.
    assert warm.engine.encode_batch_rows == items * runner.mm_budget.mm_max_toks_per_item[modality]
    assert warm.engine.kv is None
    forwards.clear()
    warm.allocate_kv_cache(8)
    assert forwards == [[DraftWorker.WARM_UP_TOKENS], [1]]  # a prefill and a decode step, before any request
    assert warm.engine.num_requests == 0 and warm.engine.num_free_blocks == 8
