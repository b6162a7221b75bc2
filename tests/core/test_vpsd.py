"""VPSD round logic: every mode transition, stops, MAT accounting, losslessness, bad input."""

from __future__ import annotations

import math

import pytest

from hippo_vllm.core import Mode, RoundStats, VpsdRequest, autoregressive, simulate

GAMMA = 4


def started(gamma: int = GAMMA) -> VpsdRequest:
    """A request past its prefill step (first token 1, no draft ran)."""
    request = VpsdRequest(gamma)
    assert request.on_step([], [1], None) == []
    return request


def optimistic(gamma: int = GAMMA) -> VpsdRequest:
    """A request whose conservative step accepted E[0]=10; pending spec [11, 12, ...]."""
    request = started(gamma)
    assert request.on_step([], [10], list(range(10, 10 + gamma))) == list(range(11, 10 + gamma))
    return request


# --- transitions ------------------------------------------------------------------------


def test_first_step_after_prefill_is_no_verification_event():
    request = VpsdRequest(GAMMA)
    assert request.mode is Mode.CONSERVATIVE
    assert request.on_step([], [1], None) == []
    assert request.mode is Mode.CONSERVATIVE
    assert request.stats == RoundStats(target_forwards=1, committed_tokens=1, conservative_rounds=1)


def test_conservative_accept_goes_optimistic_with_the_rest_of_the_chunk():
    request = started()
    assert request.on_step([], [7], [7, 8, 9, 10]) == [8, 9, 10]
    assert request.mode is Mode.OPTIMISTIC
    assert (request.stats.drafted_tokens, request.stats.accepted_tokens, request.stats.mat_count) == (1, 1, 0)


def test_conservative_reject_stays_conservative_and_records_a_run_of_one():
    request = started()
    assert request.on_step([], [5], [7, 8, 9, 10]) == []
    assert request.mode is Mode.CONSERVATIVE
    stats = request.stats
    assert (stats.drafted_tokens, stats.accepted_tokens, stats.mat_sum, stats.mat_count) == (1, 0, 1, 1)


def test_optimistic_full_accept_stays_optimistic_with_the_new_chunk():
    request = optimistic()
    assert request.on_step([11, 12, 13], [11, 12, 13, 14], [14, 15, 16, 17]) == [15, 16, 17]
    assert request.mode is Mode.OPTIMISTIC
    stats = request.stats
    assert (stats.drafted_tokens, stats.accepted_tokens) == (1 + 4, 1 + 4)
    assert (stats.optimistic_rounds, stats.conservative_rounds, stats.mat_count) == (1, 2, 0)


@pytest.mark.parametrize("m", range(GAMMA - 1))
def test_rejection_at_every_position_of_the_spec_tokens(m):
    request = optimistic()
    spec = [11, 12, 13]
    sampled = spec[:m] + [99]
    assert request.on_step(spec, sampled, [20, 21, 22, 23]) == []
    assert request.mode is Mode.CONSERVATIVE
    stats = request.stats
    assert stats.committed_tokens == 1 + 1 + m + 1
    assert stats.drafted_tokens == 1 + m + 1  # the chunk is never compared after a rejection in S
    assert stats.accepted_tokens == 1 + m
    assert (stats.mat_sum, stats.mat_count) == (1 + m + 1, 1)


def test_spec_fully_accepted_but_target_token_differs_from_the_chunk_start():
    request = optimistic()
    assert request.on_step([11, 12, 13], [11, 12, 13, 50], [14, 15, 16, 17]) == []
    assert request.mode is Mode.CONSERVATIVE
    stats = request.stats
    assert (stats.drafted_tokens, stats.accepted_tokens) == (1 + 4, 1 + 3)
    assert (stats.mat_sum, stats.mat_count) == (4 + 1, 1)


def test_optimistic_step_without_a_draft_chunk_goes_conservative_without_a_rejection():
    request = optimistic()
    assert request.on_step([11, 12, 13], [11, 12, 13, 14], None) == []
    assert request.mode is Mode.CONSERVATIVE
    assert (request.stats.drafted_tokens, request.stats.accepted_tokens, request.stats.mat_count) == (4, 4, 0)


def test_scheduler_may_verify_a_prefix_of_the_pending_spec_tokens():
    request = optimistic()
    assert request.on_step([11], [11, 12], [12, 13, 14, 15]) == [13, 14, 15]
    assert request.stats.accepted_tokens == 1 + 1 + 1


def test_gamma_one_is_pure_pre_verify():
    request = started(gamma=1)
    assert request.on_step([], [3], [3]) == []
    assert request.mode is Mode.OPTIMISTIC
    assert request.on_step([], [4], [5]) == []
    assert request.mode is Mode.CONSERVATIVE
    assert (request.stats.mat_sum, request.stats.mat_count) == (2, 1)


# --- termination ------------------------------------------------------------------------


@pytest.mark.parametrize("cut", [1, 2, 3])
def test_stop_inside_the_spec_tokens_truncates_sampled(cut):
    request = optimistic()
    assert request.on_step([11, 12, 13], [11, 12, 13][:cut], [14, 15, 16, 17], finished=True) == []
    assert request.finished
    stats = request.stats
    assert stats.committed_tokens == 2 + cut
    assert stats.drafted_tokens == stats.accepted_tokens == 1 + cut  # verification stops at the stop
    assert (stats.mat_sum, stats.mat_count) == (1 + cut, 1)  # the open run, no correction token


def test_finish_on_a_correction_records_only_the_rejection():
    request = optimistic()
    assert request.on_step([11, 12, 13], [11, 0], [20, 21, 22, 23], finished=True) == []
    assert (request.stats.mat_sum, request.stats.mat_count) == (1 + 1 + 1, 1)


def test_finish_on_an_accepted_chunk_start_closes_the_run():
    request = optimistic()
    assert request.on_step([11, 12, 13], [11, 12, 13, 14], [14, 15, 16, 17], finished=True) == []
    assert (request.stats.accepted_tokens, request.stats.mat_sum, request.stats.mat_count) == (5, 5, 1)


def test_request_finishing_at_prefill_records_no_run():
    request = VpsdRequest(GAMMA)
    assert request.on_step([], [1], None, finished=True) == []
    assert request.stats.mat_count == 0 and request.stats.mat == 0.0


def test_on_step_after_finish_raises():
    request = started()
    request.on_step([], [2], [2, 3, 4, 5], finished=True)
    with pytest.raises(ValueError, match="after the request finished"):
        request.on_step([], [3], [3, 4, 5, 6])


# --- scripted streams through simulate --------------------------------------------------


def positional(tokens, prompt_len, wrong=(), eos_at=None):
    """Target and draft over a position-indexed stream; the draft errs at ``wrong`` positions."""
    stream = list(tokens)
    if eos_at is not None:
        stream[eos_at] = 0

    def target_next(context):
        return stream[len(context) - prompt_len]

    def draft_next(context):
        position = len(context) - prompt_len
        return stream[position] + 1000 if position in wrong else stream[position]

    return target_next, draft_next


STREAM = list(range(1, 41))
PROMPT = [7, 7, 7]


def test_runs_of_three_and_five_give_mat_five():
    # γ=3: prefill T0; run D1..D3 ends when D4 is rejected as the chunk start (sample 4);
    # run D5..D9 ends when D10 is rejected inside the spec tokens (sample 6); stop at 11.
    target_next, draft_next = positional(STREAM, len(PROMPT), wrong={4, 10})
    tokens, stats = simulate(target_next, draft_next, PROMPT, gamma=3, max_tokens=11)
    assert tokens == STREAM[:11]
    assert (stats.mat_sum, stats.mat_count, stats.mat) == (10, 2, 5.0)
    assert stats == RoundStats(
        target_forwards=6,
        committed_tokens=11,
        drafted_tokens=10,
        accepted_tokens=8,
        optimistic_rounds=3,
        conservative_rounds=3,
        mat_sum=10,
        mat_count=2,
    )
    assert stats.tokens_per_target_forward == pytest.approx(11 / 6)
    assert stats.acceptance_rate == pytest.approx(0.8)


def test_max_tokens_mid_chunk_records_the_open_run():
    target_next, draft_next = positional(STREAM, len(PROMPT), wrong={4, 10})
    tokens, stats = simulate(target_next, draft_next, PROMPT, gamma=3, max_tokens=16)
    # After 15 tokens the step verifies [D15, D16]; the limit keeps D15 only.
    assert tokens == STREAM[:16]
    assert (stats.mat_sum, stats.mat_count) == (4 + 6 + 5, 3)


def test_eos_inside_the_spec_tokens_ends_the_request():
    target_next, draft_next = positional(STREAM, len(PROMPT), wrong={4, 10}, eos_at=12)
    tokens, stats = simulate(target_next, draft_next, PROMPT, gamma=3, max_tokens=30, eos=0)
    assert tokens == STREAM[:12] + [0]
    assert (stats.mat_sum, stats.mat_count) == (4 + 6 + 2, 3)  # D11, D12=EOS accepted, no correction


def test_stop_condition_inside_a_chunk_keeps_the_token_that_triggered_it():
    target_next, draft_next = positional(STREAM, len(PROMPT))
    tokens, stats = simulate(
        target_next, draft_next, PROMPT, gamma=5, max_tokens=30, stop_after=lambda out: out[-2:] == (8, 9)
    )
    assert tokens == STREAM[:9]
    assert tokens == autoregressive(target_next, PROMPT, 30, stop_after=lambda out: out[-2:] == (8, 9))
    assert stats.committed_tokens == 9 and stats.mat_count == 1


# --- random streams: lossless, asymptotics ----------------------------------------------

VOCAB = 40
MASK = (1 << 64) - 1


def unit(*values):
    """Deterministic uniform [0, 1) from int tuples (int hashing is not randomised per run)."""
    return ((hash(values) * 0x9E3779B97F4A7C15) & MASK) / 2.0**64


def random_models(seed, agreement):
    """Context-dependent greedy target and a draft that agrees with probability ``agreement``."""

    def target_next(context):
        return int(unit(seed, 1, context) * VOCAB)

    def draft_next(context):
        token = target_next(context)
        if unit(seed, 2, context) < agreement:
            return token
        return (token + 1 + int(unit(seed, 3, context) * (VOCAB - 1))) % VOCAB

    return target_next, draft_next


@pytest.mark.parametrize("restart", [False, True], ids=["conservative", "restart"])
@pytest.mark.parametrize("agreement", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("gamma", [1, 2, 3, 5, 7])
def test_simulate_commits_exactly_the_autoregressive_output(agreement, gamma, restart):
    total = RoundStats()
    for seed in range(40):
        target_next, draft_next = random_models(seed, agreement)
        prompt = [seed % VOCAB, 3]
        for max_tokens, eos in [(1, None), (2, 0), (9, None), (80, 0)]:
            tokens, stats = simulate(target_next, draft_next, prompt, gamma, max_tokens, eos=eos, restart=restart)
            assert tokens == autoregressive(target_next, prompt, max_tokens, eos=eos), (seed, max_tokens, eos)
            assert stats.committed_tokens == len(tokens)
            assert stats.optimistic_rounds + stats.conservative_rounds == stats.target_forwards
            assert stats.accepted_tokens <= stats.drafted_tokens
            assert stats.target_forwards <= len(tokens) <= gamma * stats.target_forwards
            # Every sample is one run's committed tokens: accepted drafts plus one
            # correction per rejection; only the final run may lack a correction.
            assert stats.mat_sum - stats.accepted_tokens in (stats.mat_count - 1, stats.mat_count)
            total += stats
    # The streams really exercise both modes wherever the draft is neither useless nor perfect.
    assert (total.optimistic_rounds > 0) == (agreement > 0 or total.restarts > 0)
    assert (total.accepted_tokens < total.drafted_tokens) == (agreement < 1)
    # Restarts follow rejections only, and need room for a spec token (gamma >= 2).
    assert (total.restarts > 0) == (restart and gamma >= 2 and agreement < 1)


@pytest.mark.parametrize("agreement", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("gamma", [2, 3, 5])
def test_restarting_after_a_rejection_commits_at_least_as_much_per_target_forward(agreement, gamma):
    runs = {False: [], True: []}
    for seed in range(40):
        target_next, draft_next = random_models(seed, agreement)
        for restart, stats in runs.items():
            stats.append(simulate(target_next, draft_next, [seed % VOCAB, 3], gamma, 60, restart=restart)[1])
    plain, restarted = sum(runs[False]), sum(runs[True])
    assert restarted.tokens_per_target_forward >= plain.tokens_per_target_forward
    if agreement > 0:  # a rejected round no longer spends a step on one token
        assert restarted.tokens_per_target_forward > plain.tokens_per_target_forward
        assert restarted.conservative_rounds < plain.conservative_rounds


def test_a_restart_is_verified_like_pending_spec_tokens():
    request = VpsdRequest(4)
    request.on_step([], [5], None)  # prefill
    assert request.on_step([], [6], [9, 1, 2, 3]) == []  # the chunk's first token rejected
    assert request.restart([7, 8, 9]) == [7, 8, 9] and request.mode is Mode.OPTIMISTIC
    # Two accepted, the third corrected: a run of three.
    assert request.on_step([7, 8, 9], [7, 8, 4], [1, 2, 3, 4]) == []
    assert (request.stats.restarts, request.stats.accepted_tokens, request.stats.mat_sum) == (1, 2, 4)
    # All accepted and the chunk's first token too: optimistic on with the chunk's rest.
    request.restart([1, 2])
    assert request.on_step([1, 2], [1, 2, 3], [3, 4, 5, 6]) == [4, 5, 6]


@pytest.mark.parametrize(
    "before, spec, match",
    [([], [], "1 to gamma-1=2 tokens"), ([], [1, 2, 3], "1 to gamma-1=2 tokens"),
     ([], [-1], "non-negative int token ids"), ([[1]], [1], "without pending spec tokens")],
)
def test_bad_restarts_raise_naming_what_is_allowed(before, spec, match):
    request = VpsdRequest(3)
    request.on_step([], [5], None)
    if before:
        request.on_step([], [1], [1, 1, 1])  # accepted: pending spec tokens
    with pytest.raises(ValueError, match=match):
        request.restart(spec)


def test_restart_after_finish_raises():
    request = VpsdRequest(3)
    request.on_step([], [5], None, finished=True)
    with pytest.raises(ValueError, match="after the request finished"):
        request.restart([1])


@pytest.mark.parametrize("gamma", [2, 3, 5, 7])
def test_perfect_draft_reaches_gamma_tokens_per_target_forward(gamma):
    target_next, draft_next = random_models(seed=1, agreement=1.0)
    tokens, stats = simulate(target_next, draft_next, [5], gamma, max_tokens=400)
    # Prefill gives 1 token, the first conservative step 1, every later step γ.
    assert stats.target_forwards == 2 + math.ceil((400 - 2) / gamma)
    assert stats.tokens_per_target_forward >= gamma - 0.25
    assert stats.acceptance_rate == 1.0
    assert (stats.mat_count, stats.mat) == (1, 399.0)


def test_perfect_draft_mat_grows_with_the_sequence():
    target_next, draft_next = random_models(seed=2, agreement=1.0)
    mats = [simulate(target_next, draft_next, [5], 5, n)[1].mat for n in (10, 50, 200)]
    assert mats == [9.0, 49.0, 199.0]


def test_useless_draft_gives_one_token_per_target_forward():
    target_next, draft_next = random_models(seed=3, agreement=0.0)
    tokens, stats = simulate(target_next, draft_next, [5], 5, max_tokens=60)
    assert stats.tokens_per_target_forward == 1.0
    assert (stats.mat, stats.mat_count, stats.acceptance_rate) == (1.0, 59, 0.0)
    assert stats.optimistic_rounds == 0


# --- RoundStats -------------------------------------------------------------------------


def test_round_stats_add_and_sum_fieldwise():
    a = RoundStats(1, 2, 3, 4, 5, 6, 7, 8)
    b = RoundStats(10, 20, 30, 40, 50, 60, 70, 80)
    assert a + b == RoundStats(11, 22, 33, 44, 55, 66, 77, 88)
    assert sum([a, b]) == a + b
    assert (a + b).mat == 77 / 88


def test_round_stats_ratios_are_zero_before_anything_happened():
    stats = RoundStats()
    assert (stats.mat, stats.tokens_per_target_forward, stats.acceptance_rate) == (0.0, 0.0, 0.0)
    assert set(stats.as_dict()) >= {"mat", "tokens_per_target_forward", "acceptance_rate", "mat_sum"}


# --- bad input --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "sampled", "chunk", "finished", "match"),
    [
        ([11, 12, 13], [], None, False, r"sampled must hold at least one token"),
        ([11], [11, 12, 13], None, False, r"sampled holds 3 tokens, more than len\(scheduled_spec\) \+ 1"),
        ([11, 12, 13], [11, 50, 13], None, False, r"disagrees with scheduled_spec at position 1"),
        ([11, 12, 13], [11, 12], None, False, r"sampled=\[11, 12\] ends inside .* pass finished=True"),
        ([11, 99], [11, 99, 3], None, False, r"scheduled_spec must be a prefix .* got \[11, 99\]"),
        ([11, 12, 13], [11, 12, 13, 14], [1, 2, 3, 4, 5], False, r"draft_chunk must hold 1 to gamma=4 tokens .* \[1, 2, 3, 4, 5\]"),
        ([11, 12, 13], [11, 12, 13, 14], [], False, r"draft_chunk must hold 1 to gamma=4 tokens .* \[\]"),
        ([], [1.5], None, False, r"sampled must hold non-negative int token ids, got 1\.5"),
        ([], [-3], None, False, r"sampled must hold non-negative int token ids, got -3"),
        ([], [True], None, False, r"sampled must hold non-negative int token ids, got True"),
        ("abc", [1], None, False, r"scheduled_spec must be a sequence of token ids, got str"),
        ([], [1], 7, False, r"draft_chunk must be a sequence of token ids, got int"),
        ([], [1], None, "yes", r"finished must be a bool, got 'yes'"),
    ],
)
def test_bad_step_input_raises_naming_the_argument(spec, sampled, chunk, finished, match):
    request = optimistic()
    with pytest.raises(ValueError, match=match):
        request.on_step(spec, sampled, chunk, finished=finished)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"gamma": 0}, r"gamma must be a positive int, got 0"),
        ({"max_tokens": 0}, r"max_tokens must be a positive int, got 0"),
        ({"eos": -1}, r"eos must be None or a non-negative int token id, got -1"),
        ({"prompt": ["a"]}, r"prompt must hold non-negative int token ids, got 'a'"),
    ],
)
def test_bad_driver_input_raises_naming_the_argument(kwargs, match):
    target_next, draft_next = random_models(seed=0, agreement=0.5)
    args = {"prompt": [1], "gamma": 3, "max_tokens": 5, **kwargs}
    with pytest.raises(ValueError, match=match):
        simulate(target_next, draft_next, **args)


def test_close_records_the_open_run_once_and_ends_the_request():
    request = VpsdRequest(gamma=3)
    request.on_step([], [5], None)
    next_spec = request.on_step([], [6], [6, 7, 8])  # conservative accept: run 1
    request.on_step(next_spec, [7, 8, 9], [9, 1, 2])  # all accepted + E[0]: run 4
    request.close()
    request.close()
    assert (request.stats.mat_sum, request.stats.mat_count) == (4, 1)
    with pytest.raises(ValueError, match="after the request finished"):
        request.on_step([], [1], None)
