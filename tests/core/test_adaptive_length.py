"""PEARL's adaptive draft length: the target's deadline and the draft's chunk length (pure logic)."""

import pytest

from hippo_vllm.core.adaptive_length import MIN_TOKENS, SMOOTHING, ChunkLength, VerdictDeadline, restart_length


def test_the_deadline_is_the_targets_step_less_the_answers_time_on_the_way():
    deadline = VerdictDeadline()
    assert deadline.time_budget_s() is None  # nothing measured: the draft's side drafts its budget
    # Read 0.5 s after sending, the answer already there: the way back is not measured.
    deadline.observe(sent_at=10.0, read_at=10.5, answered_at=10.5, worker_seconds=0.25)
    assert deadline.time_budget_s() == 0.5
    # The target waited 0.25 s: round trip 0.75 s, of which the worker's own 0.5 s.
    deadline.observe(sent_at=20.0, read_at=20.5, answered_at=20.75, worker_seconds=0.5)
    assert deadline.time_budget_s() == 0.5 - 0.25
    # A slower target step moves the average by SMOOTHING of the difference.
    deadline.observe(sent_at=30.0, read_at=31.5, answered_at=31.5, worker_seconds=0.25)
    assert deadline.time_budget_s() == pytest.approx(0.5 + SMOOTHING * 1.0 - 0.25)


def test_an_answer_not_back_in_time_still_times_the_targets_step():
    deadline = VerdictDeadline()
    deadline.observe(sent_at=0.0, read_at=0.5, answered_at=1.5, worker_seconds=None)
    assert deadline.time_budget_s() == 0.5  # the wait says nothing about the way back


def test_the_deadline_is_never_negative():
    deadline = VerdictDeadline()
    deadline.observe(sent_at=0.0, read_at=0.25, answered_at=2.0, worker_seconds=0.0)
    assert deadline.time_budget_s() == 0.0


@pytest.mark.parametrize(
    "times, needle",
    [((1.0, 0.5, 2.0), "sent_at <= read_at <= answered_at"), ((0.0, 1.0, 0.5), "sent_at <= read_at"),
     ((0.0, float("nan"), 1.0), "read_at must be a finite number"), (("0", 1.0, 1.0), "sent_at must be")],
)
def test_bad_readings_are_refused_by_name(times, needle):
    with pytest.raises(ValueError, match=needle):
        VerdictDeadline().observe(*times, worker_seconds=0.0)


def test_chunks_hold_the_tokens_that_fit_in_what_is_left_of_the_step():
    length = ChunkLength()
    assert length.tokens(8, time_budget_s=0.5, elapsed_s=0.0) == 8  # nothing measured yet
    length.observe(seconds=1.0, tokens=8)  # 0.125 s per token
    assert length.tokens(8, time_budget_s=0.75, elapsed_s=0.25) == 4
    assert length.tokens(3, time_budget_s=0.75, elapsed_s=0.25) == 3  # the order's budget caps it
    assert length.tokens(8, time_budget_s=None, elapsed_s=0.0) == 8  # no deadline: the budget
    # Too little time, or none left: still the shortest useful chunk (a budget of one stays one).
    assert length.tokens(8, time_budget_s=0.125, elapsed_s=0.0) == MIN_TOKENS
    assert length.tokens(8, time_budget_s=0.25, elapsed_s=0.5) == MIN_TOKENS
    assert length.tokens(1, time_budget_s=0.0, elapsed_s=0.0) == 1
    length.observe(seconds=0.0, tokens=0)  # nothing drafted: nothing learnt
    assert length.tokens(8, time_budget_s=0.75, elapsed_s=0.25) == 4


def test_the_time_per_token_follows_the_draft_with_a_moving_average():
    length = ChunkLength()
    length.observe(seconds=1.0, tokens=4)  # 0.25 s per token
    length.observe(seconds=1.0, tokens=8)  # 0.125: the average moves SMOOTHING of the way
    per_token = 0.25 + SMOOTHING * (0.125 - 0.25)
    assert length.tokens(16, time_budget_s=2.0, elapsed_s=0.0) == int(2.0 // per_token)


@pytest.mark.parametrize(
    "call, needle",
    [(lambda c: c.tokens(0, 1.0, 0.0), "budget must be an int >= 1"),
     (lambda c: c.tokens(True, 1.0, 0.0), "budget must be an int >= 1"),
     (lambda c: c.observe(float("inf"), 2), "seconds must be a finite number"),
     (lambda c: c.observe(1.0, -1), "tokens must be an int >= 0")],
)
def test_bad_arguments_are_refused_by_name(call, needle):
    with pytest.raises(ValueError, match=needle):
        call(ChunkLength())


def test_a_measured_length_needs_a_finite_deadline():
    length = ChunkLength()
    length.observe(seconds=1.0, tokens=4)
    with pytest.raises(ValueError, match="time_budget_s must be a finite number"):
        length.tokens(8, time_budget_s=float("nan"), elapsed_s=0.0)


def test_the_cost_ratio_is_a_drafted_tokens_time_over_the_targets_step():
    deadline = VerdictDeadline()
    assert deadline.cost_ratio() is None
    deadline.observe_drafting(seconds=0.5, tokens=4)
    assert deadline.cost_ratio() is None  # no target step yet
    deadline.observe(sent_at=0.0, read_at=1.0, answered_at=1.0, worker_seconds=0.5)
    assert deadline.cost_ratio() == 0.125
    deadline.observe_drafting(seconds=0.0, tokens=0)  # nothing drafted: nothing learnt
    assert deadline.cost_ratio() == 0.125


def test_a_restart_drafts_draft_then_verifys_best_length():
    # Free drafts with a perfect draft: as many as allowed; useless ones: one.
    assert restart_length(1.0, 0.0, 7) == 7
    assert restart_length(0.0, 0.1, 7) == 1
    # The optimum of (1 - a^(k+1)) / (1 - a) / (1 + k c), checked by brute force.
    for alpha, cost in ((0.785, 0.146), (0.6, 0.05), (0.9, 0.3)):
        rates = {k: (1 - alpha ** (k + 1)) / (1 - alpha) / (1 + k * cost) for k in range(1, 9)}
        assert restart_length(alpha, cost, 8) == max(rates, key=rates.get)
    assert restart_length(0.785, 0.146, 8) == 4  # this task's trained pair on CPU (c from its engine steps)
    assert restart_length(0.785, 0.146, 3) == 3  # capped


@pytest.mark.parametrize(
    "args, needle",
    [((0.5, 0.1, 0), "cap must be an int >= 1"), ((float("nan"), 0.1, 3), "acceptance must be a finite"),
     ((0.5, -1.0, 3), "cost_ratio must be a finite number >= 0")],
)
def test_bad_restart_inputs_are_refused_by_name(args, needle):
    with pytest.raises(ValueError, match=needle):
        restart_length(*args)
