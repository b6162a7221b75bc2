"""The draft engine's forwards of token ids only (``draft/token_forwards.py``): a chunk's steps.

``run_tokens`` / ``run_decode`` must give the logits and KV that ``run`` gives the same tokens
as inputs (which embeds them itself), and ``run_greedy``, a chunk's steps with their KV rows
reserved at once, exactly what those steps give one at a time, or leave every request as it
was.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_draft_engine import (  # noqa: F401 - shared fixtures
    BLOCK,
    _full_prompt,
    _pruned_prompt,
    _token,
    draft_llm,
    engine,
    eng,
    refs,
)

from hippo_vllm.vllm.draft.engine import DraftCapacityError, DraftEngine, DraftInput

pytestmark = pytest.mark.engine


@pytest.mark.parametrize("reorder", [False, True], ids=["in_order", "backend_reorders"])
def test_steps_of_token_ids_equal_the_same_steps_as_inputs(eng, refs, monkeypatch, reorder):
    """run_tokens (a chunk's first step) and run_decode (its later ones) give the logits and KV
    that run gives the same tokens, also when the backend wants the short queries first."""
    if reorder:  # as FLASHINFER's metadata builder asks; CPU_ATTN itself takes any order
        monkeypatch.setattr(eng.kv.builder, "reorder_batch_threshold", 1)
    video, text = refs["video"], refs["text"]
    emb_p, pos_p = _pruned_prompt(eng, video)
    emb_t, pos_t = _full_prompt(eng, text)
    for suffix in ("a", "b"):
        eng.run([DraftInput("p" + suffix, pos_p, inputs_embeds=emb_p),
                 DraftInput("t" + suffix, pos_t, inputs_embeds=emb_t)])
    tokens = [video.output[0], text.output[0]]
    by_inputs = eng.run([_token("pa", video, 0, tokens[0]), _token("ta", text, 0, tokens[1])])
    positions = torch.stack([video.decode_positions(0)[0, 0], text.decode_positions(0)[0, 0]])
    by_ids = eng.run_decode(["pb", "tb"], torch.tensor(tokens), positions)
    torch.testing.assert_close(by_ids, by_inputs, rtol=0, atol=1e-5)
    assert [eng.length(r) for r in ("pa", "ta")] == [eng.length(r) for r in ("pb", "tb")]
    # The next step reads the KV each path wrote: two tokens for the video request, one for the text.
    nxt = [int(t) for t in by_inputs.argmax(dim=-1)]
    two = DraftInput("pa", torch.cat([video.decode_positions(1), video.decode_positions(2)], dim=1),
                     token_ids=torch.tensor([nxt[0], 7]))
    again = eng.run([two, _token("ta", text, 1, nxt[1])])
    rows = torch.cat([positions[:1] + 1, positions[:1] + 2, positions[1:] + 1])
    torch.testing.assert_close(eng.run_tokens(["pb", "tb"], [2, 1], torch.tensor([nxt[0], 7, nxt[1]]), rows),
                               again, rtol=0, atol=1e-5)
    assert [eng.length(r) for r in ("pa", "ta")] == [eng.length(r) for r in ("pb", "tb")]
    with pytest.raises(ValueError, match="at least one token per request and a position per token"):
        eng.run_decode(["pb", "tb"], torch.tensor(nxt), positions[:1])
    with pytest.raises(ValueError, match=r"query_lens \[2, 0\]"):
        eng.run_tokens(["pb", "tb"], [2, 0], torch.tensor(nxt), positions)
    for rid in ("pa", "ta", "pb", "tb"):
        eng.free(rid)


def _prefill_pair(eng, refs, suffix: str) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """A pruned video request and a text request prefilled as ``p<suffix>`` / ``t<suffix>``, with
    the first generated token of each and its position (what a chunk's steps start from)."""
    video, text = refs["video"], refs["text"]
    emb_p, pos_p = _pruned_prompt(eng, video)
    emb_t, pos_t = _full_prompt(eng, text)
    ids = ["p" + suffix, "t" + suffix]
    eng.run([DraftInput(ids[0], pos_p, inputs_embeds=emb_p), DraftInput(ids[1], pos_t, inputs_embeds=emb_t)])
    tokens = torch.tensor([video.output[0], text.output[0]])
    positions = torch.stack([video.decode_positions(0)[0, 0], text.decode_positions(0)[0, 0]])
    return ids, tokens, positions


def _one_at_a_time(eng, ids, query_lens, tokens, positions, steps: int) -> torch.Tensor:
    """The chunk's steps one forward each: the first feeds ``tokens``, each later one the last argmax."""
    drafted = [eng.run_tokens(ids, query_lens, tokens, positions).argmax(dim=-1)]
    after = positions[torch.tensor(query_lens).cumsum(0) - 1] + 1  # each request's next position
    for step in range(steps - 1):
        drafted.append(eng.run_decode(ids, drafted[-1], after + step).argmax(dim=-1))
    return torch.stack(drafted, dim=1)


@pytest.mark.parametrize("first", ["one_row_each", "rows_backend_reorders"])
def test_greedy_steps_equal_the_same_steps_one_at_a_time_and_reserve_once(eng, refs, monkeypatch, first):
    """The same tokens and logits, every step's rows reserved at once, and the KV the next step
    reads; also with a first step of several rows for one request, which a backend that wants
    the short queries first puts last (the whole chunk keeps that order)."""
    steps = 3
    ids_a, tokens, positions = _prefill_pair(eng, refs, "a")
    ids_b, _, _ = _prefill_pair(eng, refs, "b")
    query_lens = [1, 1]
    if first == "rows_backend_reorders":  # the video request refeeds its token and one more
        monkeypatch.setattr(eng.kv.builder, "reorder_batch_threshold", 1)
        query_lens = [2, 1]
        tokens = torch.tensor([int(tokens[0]), 7, int(tokens[1])])
        positions = torch.stack([positions[0], positions[0] + 1, positions[1]])
    logits, forward = [], eng._forward_rows
    monkeypatch.setattr(eng, "_forward_rows", lambda *a, **kw: logits.append(forward(*a, **kw)) or logits[-1])
    expected = _one_at_a_time(eng, ids_a, query_lens, tokens, positions, steps)
    reservations = []
    reserve = eng.kv.reserve
    monkeypatch.setattr(eng.kv, "reserve", lambda lengths: reservations.append(dict(lengths)) or reserve(lengths))
    drafted = eng.run_greedy(ids_b, query_lens, tokens, positions, steps)
    assert torch.equal(drafted, expected)
    # Each step attended to exactly the rows it does one at a time. The first forwards' rows are
    # in the backend's order on both paths; the later steps' are in it only on run_greedy's.
    order = [1, 0] if first == "rows_backend_reorders" else [0, 1]
    one_by_one = [logits[0], *(step_logits[order] for step_logits in logits[1:steps])]
    torch.testing.assert_close(torch.stack(logits[steps:]), torch.stack(one_by_one), rtol=0, atol=1e-5)
    monkeypatch.undo()
    # Every step's rows in one reservation, and the lengths the steps one at a time leave.
    assert len(reservations) == 1 and reservations[0] == {r: eng.length(r) for r in ids_b}
    assert [eng.length(r) for r in ids_a] == [eng.length(r) for r in ids_b]
    # The next step reads the KV each path wrote.
    after = positions[torch.tensor(query_lens).cumsum(0) - 1] + steps
    torch.testing.assert_close(eng.run_decode(ids_b, drafted[:, -1], after),
                               eng.run_decode(ids_a, expected[:, -1], after), rtol=0, atol=1e-5)
    for rid in ids_a + ids_b:
        eng.free(rid)


def test_greedy_steps_with_decode_graphs_reserve_each_later_row_as_its_graph_replays(eng, refs, monkeypatch):
    """Decode graphs read the KV lengths step by step: the first step's rows are reserved first,
    then each later step's row right before its graph replays, and the tokens are the same.
    (The graphs themselves need CUDA; here a stand-in replays the same forward eagerly.)"""
    steps = 3
    ids_a, tokens, positions = _prefill_pair(eng, refs, "a")
    ids_b, _, _ = _prefill_pair(eng, refs, "b")
    expected = _one_at_a_time(eng, ids_a, [1, 1], tokens, positions, steps)
    replayed = []

    def replay(req_ids, rows, positions3):  # what a captured graph computes, run eagerly
        replayed.append([eng.length(r) for r in req_ids])
        monkeypatch.setattr(eng, "decode_graphs", None)
        try:
            return eng._forward_rows(req_ids, [1] * len(req_ids), rows, positions3)
        finally:
            monkeypatch.setattr(eng, "decode_graphs", graphs)

    graphs = SimpleNamespace(covers=lambda query_lens: all(n == 1 for n in query_lens), run=replay)
    monkeypatch.setattr(eng, "decode_graphs", graphs)
    before = [eng.length(r) for r in ids_b]
    drafted = eng.run_greedy(ids_b, [1, 1], tokens, positions, steps)
    assert torch.equal(drafted, expected)
    # Every replay saw exactly its own row reserved, one more each step.
    assert replayed == [[n + step + 1 for n in before] for step in range(steps)]
    for rid in ids_a + ids_b:
        eng.free(rid)


def test_greedy_steps_without_room_or_with_a_failing_step_leave_every_request_as_it_was(draft_llm, tiny, refs,
                                                                                        monkeypatch):
    text = refs["text"]  # 40 rows: two blocks of 32, room for 24 more tokens
    small = DraftEngine(draft_llm[0].llm_engine.vllm_config, tiny.draft, num_blocks=2, block_size=BLOCK)
    emb, pos = _full_prompt(small, text)
    small.run([DraftInput("t", pos, inputs_embeds=emb)])
    token, position = torch.tensor([text.output[0]]), text.decode_positions(0)[0]
    before = (small.length("t"), small.num_used_blocks)
    with pytest.raises(DraftCapacityError, match="needs 1 more blocks of 32 tokens but only 0 of 2"):
        small.run_greedy(["t"], [1], token, position, 2 * BLOCK - len(text.prompt_ids) + 1)
    assert (small.length("t"), small.num_used_blocks) == before

    forward, calls = small._forward_rows, []

    def second_step_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected draft failure")
        return forward(*args, **kwargs)

    monkeypatch.setattr(small, "_forward_rows", second_step_fails)
    with pytest.raises(RuntimeError, match="injected draft failure"):
        small.run_greedy(["t"], [1], token, position, 3)
    assert (small.length("t"), small.num_used_blocks) == before
    monkeypatch.undo()
    # Nothing of the failed steps stays behind: the same steps now give what they give one at a time.
    drafted = small.run_greedy(["t"], [1], token, position, 3)
    small.truncate("t", before[0])
    assert torch.equal(drafted, _one_at_a_time(small, ["t"], [1], token, position, 3))


def test_bad_greedy_steps_are_refused_with_the_values_named(eng):
    with pytest.raises(ValueError, match=r"steps must be >= 1, got 0"):
        eng.run_greedy(["x"], [1], torch.tensor([1]), torch.tensor([4]), 0)
    with pytest.raises(ValueError, match=r"a position per token, got 2 requests, query_lens \[1, 1\], token_ids \(1,\)"):
        eng.run_greedy(["x", "y"], [1, 1], torch.tensor([1]), torch.tensor([4]), 2)
    with pytest.raises(ValueError, match=r"run_greedy: at least one token per request.*query_lens \[2, 0\]"):
        eng.run_greedy(["x", "y"], [2, 0], torch.tensor([1, 2]), torch.tensor([4, 5]), 2)
    assert eng.num_requests == 0
