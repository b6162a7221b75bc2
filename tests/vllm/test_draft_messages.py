"""The target's side of the draft protocol sends each thing once, and again only when the draft lost it.

Pure logic: ``DraftMessages`` builds the step's work from chunk plans; the
draft's side is stood in for by replaying the orders' deltas.
"""

from __future__ import annotations

import random

import torch

from hippo_vllm.vllm.protocol import DraftPrompt, StepResult, ViewReport, common_prefix
from hippo_vllm.vllm.target.draft_messages import ChunkPlan, DraftMessages, SentStep


class Sent:
    """Counts what the target's side asks of the runner and the capture."""

    def __init__(self):
        self.prompts, self.attention = [], []

    def prompt_of(self, req_id):
        self.prompts.append(req_id)
        return DraftPrompt(req_id, [1, 2, 3], [], torch.zeros(3, 3, dtype=torch.long), 0)

    def attention_of(self, req_id):
        self.attention.append(req_id)
        return [torch.ones(4)]


def view_report(req_id):
    return ViewReport(req_id, torch.arange(3), 3, 0, 0, 0.0, True)


def test_a_prompt_and_its_attention_travel_once_and_orders_carry_only_the_change():
    messages, sent = DraftMessages(), Sent()
    work = messages.work([ChunkPlan("r", [5, 6], 3)], sent.prompt_of, sent.attention_of)
    assert [(p.req_id, p.prompt is not None, p.attention is not None) for p in work.prefills] == [("r", True, True)]
    assert [(c.kept, c.new_tokens, c.budget) for c in work.chunks] == [(0, [5, 6], 3)]
    messages.received(SentStep.of(work), StepResult(work.seq, views=[view_report("r")]))
    # Rejected look-ahead: the orders share [5, 6, 7] only.
    messages.work([ChunkPlan("r", [5, 6, 7, 8], 3)], sent.prompt_of, sent.attention_of)
    work = messages.work([ChunkPlan("r", [5, 6, 7, 9, 10], 2)], sent.prompt_of, sent.attention_of)
    assert work.prefills == [] and [(c.kept, c.new_tokens) for c in work.chunks] == [(3, [9, 10])]
    # Preempted: the draft KV goes, prompt and view stay; the prefill comes again, alone.
    messages.release("r", finished=False)
    work = messages.work([ChunkPlan("r", [5, 6, 7, 9, 10, 11], 3)], sent.prompt_of, sent.attention_of)
    assert [(r.req_id, r.finished) for r in work.releases] == [("r", False)]
    assert [(p.prompt, p.attention) for p in work.prefills] == [(None, None)]
    assert work.chunks[0].kept == 0 and work.chunks[0].new_tokens == [5, 6, 7, 9, 10, 11]
    assert sent.prompts == ["r"] and sent.attention == ["r"]
    # Finished: everything goes; a request the draft's side never saw needs no release.
    messages.release("r", finished=True)
    messages.release("never-sent", finished=True)
    work = messages.work([], sent.prompt_of, sent.attention_of)
    assert [(r.req_id, r.finished) for r in work.releases] == [("r", True)]
    assert messages.held_requests() == [] and messages.num_views == 0


def test_a_prefill_without_room_is_sent_again_with_the_next_chunk():
    messages, sent = DraftMessages(), Sent()
    work = messages.work([ChunkPlan("r", [5], 3)], sent.prompt_of, sent.attention_of)
    messages.received(SentStep.of(work), StepResult(work.seq, views=[view_report("r")], no_room=["r"]))
    assert messages.num_prefilled == 0
    work = messages.work([ChunkPlan("r", [5, 6], 3)], sent.prompt_of, sent.attention_of)
    assert [(p.req_id, p.prompt, p.attention) for p in work.prefills] == [("r", None, None)]  # it has its view
    # A chunk without room (the prefill was earlier) keeps the request prefilled.
    messages.received(SentStep.of(work), StepResult(work.seq))
    work = messages.work([ChunkPlan("r", [5, 6, 7], 3)], sent.prompt_of, sent.attention_of)
    messages.received(SentStep.of(work), StepResult(work.seq, no_room=["r"]))
    assert messages.num_prefilled == 1
    assert sent.prompts == ["r"]


def test_a_new_epoch_forgets_everything_the_draft_held():
    messages, sent = DraftMessages(), Sent()
    work = messages.work([ChunkPlan("r", [5, 6], 3)], sent.prompt_of, sent.attention_of)
    messages.received(SentStep.of(work), StepResult(work.seq, views=[view_report("r")]))
    messages.release("r", finished=False)
    messages.sync_epoch(1)
    work = messages.work([ChunkPlan("r", [5, 6, 7], 3)], sent.prompt_of, sent.attention_of)
    assert work.releases == []  # the draft's side holds nothing to release
    assert work.prefills[0].prompt is not None and work.prefills[0].attention is not None
    assert (work.chunks[0].kept, work.chunks[0].new_tokens) == (0, [5, 6, 7])
    assert work.seq == 1


def test_step_failures_resend_prompts_and_unsent_releases_are_kept():
    messages, sent = DraftMessages(), Sent()
    messages.work([ChunkPlan("r", [5], 3)], sent.prompt_of, sent.attention_of)
    messages.release("r", finished=False)
    lost = messages.work([], sent.prompt_of, sent.attention_of)
    messages.requeue(lost.releases)
    messages.resend_prompts(["r"])
    work = messages.work([ChunkPlan("r", [5, 6], 3)], sent.prompt_of, sent.attention_of)
    assert [r.req_id for r in work.releases] == ["r"] and work.prefills[0].prompt is not None


def test_common_prefix():
    rng = random.Random(0)
    for _ in range(500):
        a = [rng.randint(0, 2) for _ in range(rng.randint(0, 9))]
        b = [rng.randint(0, 2) for _ in range(rng.randint(0, 9))]
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        assert common_prefix(a, b) == n
