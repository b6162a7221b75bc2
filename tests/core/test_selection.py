"""num_kept and select_tokens: counts, order, ties, per-frame quotas, bad input."""

from __future__ import annotations

import pytest
import torch

from hippo_vllm.core import VideoGrid, num_kept, select_tokens


@pytest.mark.parametrize(
    ("num_tokens", "keep_ratio", "expected"),
    [
        (100, 0.1, 10),
        (30, 0.1, 3),
        (101, 0.1, 11),
        (16384, 0.1, 1639),
        (50, 1.0, 50),
        (50, 1e-9, 1),
        (7, 0.5, 4),
        (1, 0.3, 1),
    ],
)
def test_num_kept_is_ceil_with_floor_of_one(num_tokens, keep_ratio, expected):
    assert num_kept(num_tokens, keep_ratio) == expected


def test_global_selection_keeps_the_top_scores_in_ascending_order():
    grid = VideoGrid(2, 3, 4)
    scores = torch.randperm(grid.num_tokens, generator=torch.Generator().manual_seed(0)).float()
    kept = select_tokens(scores, grid, keep_ratio=0.25)
    assert kept.dtype == torch.int64 and kept.numel() == 6
    assert torch.equal(kept, torch.sort(kept).values)
    assert set(kept.tolist()) == set(torch.argsort(scores, descending=True)[:6].tolist())


def test_ratio_one_keeps_everything_and_tiny_ratio_keeps_the_best_token():
    grid = VideoGrid(3, 4, 4)
    scores = torch.rand(grid.num_tokens, generator=torch.Generator().manual_seed(1))
    assert torch.equal(select_tokens(scores, grid, 1.0), torch.arange(grid.num_tokens))
    assert select_tokens(scores, grid, 1e-6).tolist() == [int(scores.argmax())]


def test_ties_prefer_lower_indices_deterministically():
    grid = VideoGrid(1, 2, 5)
    scores = torch.tensor([1.0, 3.0, 2.0, 3.0, 3.0, 0.0, 3.0, 2.0, 2.0, 3.0])
    assert select_tokens(scores, grid, 0.3).tolist() == [1, 3, 4]
    assert select_tokens(torch.zeros(10), grid, 0.2).tolist() == [0, 1]
    # -0.0 and 0.0 compare equal, so they tie too.
    assert select_tokens(torch.tensor([-0.0, 0.0] * 5), grid, 0.1).tolist() == [0]


def test_infinite_scores_rank_at_the_ends():
    grid = VideoGrid(1, 1, 4)
    scores = torch.tensor([0.0, float("inf"), float("-inf"), 1.0])
    assert select_tokens(scores, grid, 0.5).tolist() == [1, 3]


def test_per_frame_mode_gives_each_frame_the_same_quota():
    grid = VideoGrid(3, 2, 5)
    # Frame 0 has all the large scores; per-frame quotas still spread the budget.
    scores = torch.cat(
        [torch.full((10,), 100.0) + torch.arange(10.0), torch.arange(10.0), -torch.arange(10.0)]
    )
    kept = select_tokens(scores, grid, keep_ratio=0.2, mode="per_frame")
    assert kept.tolist() == [8, 9, 18, 19, 20, 21]
    assert torch.equal(grid.frame_of(kept).bincount(minlength=3), torch.tensor([2, 2, 2]))
    assert select_tokens(scores, grid, keep_ratio=0.2, mode="global").tolist() == [4, 5, 6, 7, 8, 9]
    # Quota uses ceil per frame: 0.15 · 10 → 2 per frame.
    assert select_tokens(scores, grid, 0.15, mode="per_frame").numel() == 6


@pytest.mark.parametrize(
    ("keep_ratio", "pattern"),
    [
        (0, r"keep_ratio must be in \(0, 1\], got 0"),
        (1.5, r"keep_ratio must be in \(0, 1\], got 1.5"),
        (float("nan"), r"keep_ratio must be in \(0, 1\], got nan"),
        (-0.1, r"keep_ratio must be in \(0, 1\], got -0.1"),
        (True, r"keep_ratio must be a number in \(0, 1\], got True \(bool\)"),
        ("0.1", r"keep_ratio must be a number in \(0, 1\], got '0.1' \(str\)"),
    ],
)
def test_rejects_bad_keep_ratio(keep_ratio, pattern):
    grid = VideoGrid(1, 2, 2)
    with pytest.raises(ValueError, match=pattern):
        select_tokens(torch.zeros(4), grid, keep_ratio)
    with pytest.raises(ValueError, match=pattern):
        num_kept(4, keep_ratio)


@pytest.mark.parametrize(
    ("scores", "kwargs", "pattern"),
    [
        (torch.tensor([0.0, float("nan"), 1.0, 2.0]), {}, r"scores contains NaN at 1 of 4 tokens"),
        (torch.zeros(2, 2), {}, r"scores must have shape \[4\] .*got \[2, 2\]"),
        (torch.zeros(4, dtype=torch.bool), {}, r"scores must have a real dtype.*torch.bool"),
        (
            torch.zeros(4),
            {"mode": "per_video"},
            r"mode must be one of 'global', 'per_frame'; got 'per_video'",
        ),
    ],
)
def test_rejects_bad_scores_and_mode(scores, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        select_tokens(scores, VideoGrid(1, 2, 2), 0.5, **kwargs)


def test_num_kept_rejects_bad_token_count():
    with pytest.raises(ValueError, match=r"num_tokens must be a positive int, got 0"):
        num_kept(0, 0.1)
