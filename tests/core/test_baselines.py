"""Baseline selectors: equal budgets, uniform spacing, SpecVLM's two stages, EVS-like temporal."""

from __future__ import annotations

import pytest
import torch

from hippo_vllm.core import (
    VideoGrid,
    num_kept,
    select_attention_topk,
    select_specvlm,
    select_temporal,
    select_tokens,
    select_uniform,
    temporal_scores,
)

from .synthetic_video import moving_object_video


@pytest.mark.parametrize("keep_ratio", [0.05, 0.1, 0.37, 1.0])
def test_every_baseline_keeps_the_same_number_of_sorted_unique_tokens(keep_ratio):
    grid = VideoGrid(4, 6, 7)
    generator = torch.Generator().manual_seed(0)
    attn = torch.rand(grid.num_tokens, generator=generator)
    embeds = torch.randn(grid.num_tokens, 16, generator=generator)
    expected = num_kept(grid.num_tokens, keep_ratio)
    for kept in (
        select_attention_topk(attn, grid, keep_ratio),
        select_uniform(grid, keep_ratio),
        select_temporal(embeds, grid, keep_ratio),
        select_specvlm(attn, grid, keep_ratio),
    ):
        assert kept.dtype == torch.int64 and kept.numel() == expected
        assert torch.equal(kept, torch.unique(kept))  # unique and ascending


def test_uniform_is_evenly_spaced_including_both_ends():
    assert select_uniform(VideoGrid(1, 10, 10), 0.05).tolist() == [0, 25, 50, 74, 99]
    assert select_uniform(VideoGrid(1, 1, 10), 0.3).tolist() == [0, 5, 9]  # 4.5 rounds up
    assert select_uniform(VideoGrid(1, 1, 10), 0.01).tolist() == [0]
    kept = select_uniform(VideoGrid(64, 16, 16), 0.1)
    assert kept.numel() == 1639 and int(kept[0]) == 0 and int(kept[-1]) == 16383
    assert set(kept.diff().tolist()) == {10, 11}  # step 16383 / 1638 ≈ 10.002


def test_attention_topk_equals_global_selection_of_attn():
    grid = VideoGrid(3, 4, 4)
    attn = torch.rand(grid.num_tokens, generator=torch.Generator().manual_seed(1))
    assert torch.equal(select_attention_topk(attn, grid, 0.2), select_tokens(attn, grid, 0.2))


def test_temporal_equals_top_k_of_temporal_scores():
    grid = VideoGrid(5, 6, 8)
    embeds = moving_object_video(grid, seed=4, changing_appearance=True)
    scores = temporal_scores(embeds, grid)
    kept = select_temporal(embeds, grid, 0.1)
    expected = torch.sort(torch.sort(scores, descending=True, stable=True).indices[: kept.numel()]).values
    assert torch.equal(kept, expected)


def test_specvlm_stage_one_takes_the_heavy_tokens_and_stage_two_spreads_the_rest():
    grid = VideoGrid(1, 10, 10)
    attn = torch.full((100,), 0.001)
    heavy = [13, 57, 91]
    attn[heavy] = torch.tensor([0.2, 0.15, 0.1])
    # Total 0.547: the two heaviest cover 64%, all three 82%, so mass 0.75 needs exactly three.
    kept = select_specvlm(attn, grid, keep_ratio=0.1, mass=0.75)
    assert kept.numel() == 10
    assert set(heavy) <= set(kept.tolist())
    # Stage II: 7 picks at linspace(0, 96, 7) truncated over the 97 remaining positions.
    remaining = [position for position in range(100) if position not in heavy]
    uniform = [remaining[(i * 96) // 6] for i in range(7)]
    assert kept.tolist() == sorted(heavy + uniform)


def test_specvlm_stage_one_is_capped_at_the_budget_and_mass_zero_takes_one_token():
    grid = VideoGrid(1, 4, 5)
    attn = torch.arange(20, dtype=torch.float32)  # mass is spread: 40% needs 5 tokens, budget 2
    assert select_specvlm(attn, grid, keep_ratio=0.1, mass=0.4).tolist() == [18, 19]
    # mass 0: stage I still keeps the heaviest token, stage II fills from the rest.
    assert select_specvlm(attn, grid, keep_ratio=0.15, mass=0.0).tolist() == [0, 18, 19]
    # mass 1 with all-zero attention still returns a full budget.
    assert select_specvlm(torch.zeros(20), grid, keep_ratio=0.25, mass=1.0).numel() == 5


@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        (lambda g, a: select_specvlm(a, g, 0.1, mass=1.5), r"mass must be in \[0, 1\], got 1.5"),
        (lambda g, a: select_specvlm(-a, g, 0.1), r"attn must be non-negative, got minimum"),
        (
            lambda g, a: select_attention_topk(a[:-1], g, 0.1),
            r"attn must have shape \[20\].*got \[19\]",
        ),
        (lambda g, a: select_uniform(g, 0.0), r"keep_ratio must be in \(0, 1\], got 0.0"),
        (lambda g, a: select_uniform((1, 4, 5), 0.1), r"grid must be a VideoGrid"),
        (
            lambda g, a: select_temporal(torch.zeros(20, 3), g, 2),
            r"keep_ratio must be in \(0, 1\], got 2",
        ),
        (
            lambda g, a: select_temporal(torch.zeros(21, 3), g, 0.1),
            r"video_embeds must have shape \[20, D\]",
        ),
    ],
)
def test_baselines_reject_bad_input(call, pattern):
    grid = VideoGrid(1, 4, 5)
    with pytest.raises(ValueError, match=pattern):
        call(grid, torch.rand(20, generator=torch.Generator().manual_seed(0)) + 0.01)
