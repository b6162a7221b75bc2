"""VPSD rounds over step records and chunks as token lists (pure logic).

vLLM sometimes runs a step without calling the drafter; the rounds notice it
when the next step starts and account what each request committed in it when the
request is next scheduled.
"""

from __future__ import annotations

from hippo_vllm.vllm.metrics.stats import HippoStats
from hippo_vllm.vllm.target.parallel_rounds import ParallelRounds
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
