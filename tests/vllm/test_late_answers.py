"""Late answers of the draft's side and the streak of step-wide failures: pure logic."""

from __future__ import annotations

from hippo_vllm.vllm.metrics.stats import HippoStats
from hippo_vllm.vllm.target.draft_messages import SentStep
from hippo_vllm.vllm.target.drafting_failures import MAX_FAILED_STEPS_IN_A_ROW, DraftingFailures
from hippo_vllm.vllm.target.late_answers import MAX_LATE_STEPS, LateAnswers


class Pending:
    """A step's answer that is back once ``arrive`` is called (``result(0)`` never waits)."""

    def __init__(self, seq: int):
        self.seq = seq
        self.answer = None

    def arrive(self) -> None:
        self.answer = f"answer {self.seq}"

    def result(self, timeout):
        assert timeout == 0, "late answers are read without waiting"
        return self.answer


def sent(seq: int) -> SentStep:
    return SentStep(seq, frozenset(), (f"req-{seq}",))


def test_answers_are_taken_in_as_they_come_and_the_others_keep_waiting():
    taken, forgotten = [], []
    late = LateAnswers(lambda s, result: taken.append((s.seq, result)), forgotten.extend)
    pendings = [Pending(seq) for seq in range(3)]
    for seq, pending in enumerate(pendings):
        late.wait(sent(seq), pending)
    late.collect()
    assert taken == [] and len(late) == 3
    pendings[1].arrive()
    late.collect()
    assert taken == [(1, "answer 1")]
    assert [s.seq for s in late.sent_steps] == [0, 2]
    pendings[0].arrive()
    pendings[2].arrive()
    late.collect()
    assert taken == [(1, "answer 1"), (0, "answer 0"), (2, "answer 2")] and len(late) == 0
    assert forgotten == []


def test_beyond_the_bound_the_oldest_answer_is_given_up_and_its_requests_forgotten():
    taken, forgotten = [], []
    late = LateAnswers(lambda s, result: taken.append(s.seq), forgotten.extend)
    for seq in range(MAX_LATE_STEPS + 2):
        late.wait(sent(seq), Pending(seq))
    assert len(late) == MAX_LATE_STEPS
    assert forgotten == ["req-0", "req-1"]
    assert late.sent_steps[0].seq == 2
    late.clear()
    late.collect()
    assert len(late) == 0 and taken == []


def test_drafting_stops_only_after_consecutive_steps_with_a_step_wide_failure():
    failures = DraftingFailures(HippoStats())
    for _ in range(MAX_FAILED_STEPS_IN_A_ROW - 1):
        failures.new_step()
        assert not failures.step_failed()
        assert not failures.step_failed()  # two failures in one step count once
    failures.new_step()  # a step without a failure ends the streak
    failures.new_step()
    assert failures.steps_in_a_row == 0
    verdicts = []
    for _ in range(MAX_FAILED_STEPS_IN_A_ROW):
        failures.new_step()
        verdicts.append(failures.step_failed())
    assert verdicts == [False] * (MAX_FAILED_STEPS_IN_A_ROW - 1) + [True]
    assert failures.steps_in_a_row == MAX_FAILED_STEPS_IN_A_ROW
