"""VPSD rounds over step records and chunks as token lists (pure logic), and their
restarts after a rejection with a draft of its own (``ParallelSchedule``).

vLLM sometimes runs a step without calling the drafter; the rounds notice it
when the next step starts and account what each request committed in it when the
request is next scheduled.
"""

from __future__ import annotations

from hippo_vllm.core.adaptive_length import VerdictDeadline, restart_length
from hippo_vllm.vllm.metrics.stats import HippoStats
from hippo_vllm.vllm.target.parallel_rounds import ParallelRounds
from hippo_vllm.vllm.target.schedules import ParallelSchedule
from hippo_vllm.vllm.target.step_records import RequestRecord

GAMMA = 3


def scheduled(outputs, spec=(), budget=GAMMA, req_id="r"):
    return RequestRecord(req_id, -1, 8, list(outputs), list(spec), None, budget)


def test_optimistic_after_a_matching_chunk_and_conservative_after_a_step_without_the_drafter():
    stats = HippoStats()
    rounds = ParallelRounds(GAMMA, stats)
    assert rounds.start("r", [10]) == []  # the prefill step: conservative
    (plan,) = rounds.launch([scheduled([10])])
    assert (plan.req_id, plan.outputs, plan.budget) == ("r", [10], GAMMA)
    assert rounds.resolve("r", [], [11], [11, 12, 13]) == [12, 13]  # the chunk's first token matched
    rounds.finish_step()

    # The spec tokens [12, 13] are verified in a step vLLM runs without the drafter.
    (plan,) = rounds.launch([scheduled([10, 11], spec=[12, 13])])
    assert plan.outputs == [10, 11, 12, 13]
    assert rounds.launch([scheduled([1], req_id="other")]) == []  # "r" is not scheduled in the next one
    assert stats.target_forwards == 2
    # When "r" is next scheduled, the skipped step is accounted with what it committed, conservatively.
    (plan,) = rounds.launch([scheduled([10, 11, 12, 13, 14])])
    assert stats.target_forwards == 3 and stats.round_accepted_tokens == 1 + 2
    assert plan.outputs == [10, 11, 12, 13, 14]
    assert rounds.resolve("r", [], [15], None) == []  # no chunk came: conservative
    rounds.finish_step()

    # vLLM's placeholder spec tokens after a skipped step restart the round.
    assert rounds.launch([scheduled([10, 11, 12, 13, 14, 15], spec=[-1, -1])]) == []
    assert rounds.resolve("r", [-1, -1], [16], None) == []
    rounds.finish_step()
    assert rounds.has("r")
    rounds.release("r")
    assert not rounds.has("r")


def test_no_chunk_is_ordered_without_budget():
    rounds = ParallelRounds(GAMMA, HippoStats())
    rounds.start("r", [10])
    assert rounds.launch([scheduled([10], budget=0)]) == []
    assert rounds.resolve("r", [], [11], None) == []


def restarting_schedule(stats, deadline=None):
    schedule = ParallelSchedule(GAMMA, stats, deadline)
    schedule.restarts = True
    return schedule


def sampled(outputs, spec, committed, budget=GAMMA):
    """The record after sampling: ``committed`` is in ``outputs`` already."""
    return RequestRecord("r", 0, 8, list(outputs), list(spec), None, budget, list(committed))


def test_a_rejected_round_restarts_with_a_chunk_the_target_waits_for():
    stats = HippoStats()
    schedule = restarting_schedule(stats)
    schedule.start(sampled([10], [], [10]))
    schedule.plan_before_forward([scheduled([10])])
    record = sampled([10, 11], [], [11])
    assert schedule.follow(record, [7, 8, 9]) == []  # the chunk's first token rejected
    plan = schedule.restart_plan(record, [], [7, 8, 9])
    assert (plan.req_id, plan.outputs, plan.budget) == ("r", [10, 11], GAMMA - 1)
    assert schedule.drafted("r", [12, 13]) == [12, 13] and stats.round_restarts == 1
    schedule.finish_step()
    # The next step verifies the restart's tokens; the chunk drafted meanwhile assumes them.
    (plan,) = schedule.plan_before_forward([scheduled([10, 11], spec=[12, 13])])
    assert plan.outputs == [10, 11, 12, 13]
    assert schedule.follow(sampled([10, 11, 12, 13, 14], [12, 13], [12, 13, 14]), [14, 15, 16]) == [15, 16]
    assert stats.round_accepted_tokens == 2 + 1 and stats.optimistic_rounds == 1


def test_no_restart_without_a_rejected_chunk_or_room_or_a_draft_of_its_own():
    schedule = restarting_schedule(HippoStats())
    schedule.start(sampled([10], [], [10]))
    schedule.plan_before_forward([scheduled([10])])
    record = sampled([10, 11], [], [11])
    assert schedule.follow(record, None) == []
    assert schedule.restart_plan(record, [], None) is None  # no chunk came back: no reason to wait
    assert schedule.restart_plan(sampled([10, 11], [], [11], budget=0), [], [7]) is None  # no room
    assert schedule.restart_plan(record, [12, 13], [11, 12, 13]) is None  # it has spec tokens
    assert schedule.drafted("r", []) == []  # a restart that did not come back: none
    schedule.restarts = False
    assert schedule.restart_plan(record, [], [7, 8, 9]) is None
    assert not schedule.needs_outputs_after_sampling


def test_with_the_adaptive_length_a_restart_drafts_draft_then_verifys_best_length():
    stats = HippoStats()
    deadline = VerdictDeadline()
    schedule = ParallelSchedule(8, stats, deadline)
    schedule.restarts = True
    schedule.start(sampled([10], [], [10]))
    schedule.plan_before_forward([scheduled([10], budget=8)])
    record = sampled([10, 11], [], [11], budget=8)
    schedule.follow(record, [7])
    assert schedule.restart_plan(record, [], [7]).budget == 7  # nothing measured yet: γ−1
    stats.round_drafted_tokens, stats.round_accepted_tokens = 100, 80
    deadline.observe(sent_at=0.0, read_at=1.0, answered_at=1.0, worker_seconds=0.5)
    deadline.observe_drafting(seconds=0.5, tokens=4)  # c = 0.125
    assert schedule.restart_plan(record, [], [7]).budget == restart_length(0.8, 0.125, 7) < 7
