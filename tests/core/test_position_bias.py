"""Boundary selection ratio and boundary attention mass."""

from __future__ import annotations

import pytest
import torch

from hippo_vllm.core import VideoGrid, boundary_attention_mass, position_bias


def test_ring_only_interior_only_and_unbiased_selections():
    grid = VideoGrid(2, 6, 6)  # 20 of 36 tokens per frame are on the ring
    ring = grid.boundary_mask()
    assert position_bias(torch.nonzero(ring).reshape(-1), grid) == pytest.approx(36 / 20)
    assert position_bias(torch.nonzero(~ring).reshape(-1), grid) == 0.0
    assert position_bias(torch.arange(grid.num_tokens), grid) == pytest.approx(1.0)
    # 3 ring + 1 interior of 4 kept: (3/4) / (20/36).
    assert position_bias(torch.tensor([0, 1, 2, 14]), grid) == pytest.approx(0.75 * 36 / 20)


def test_ring_covering_the_whole_frame_means_no_bias():
    assert position_bias(torch.tensor([0, 3]), VideoGrid(1, 2, 5)) == 1.0


def test_boundary_attention_mass():
    grid = VideoGrid(1, 3, 3)  # only the centre token (index 4) is off the ring
    attn = torch.full((9,), 1.0)
    attn[4] = 7.0
    assert boundary_attention_mass(attn, grid) == pytest.approx(8 / 15)
    assert boundary_attention_mass(torch.ones(9), grid) == pytest.approx(8 / 9)


@pytest.mark.parametrize(
    ("selected", "pattern"),
    [
        (
            torch.tensor([], dtype=torch.int64),
            r"selected must be a non-empty 1-D index tensor, got shape \[0\]",
        ),
        (
            torch.tensor([[0, 1]]),
            r"selected must be a non-empty 1-D index tensor, got shape \[1, 2\]",
        ),
        (
            torch.tensor([0, 9]),
            r"selected must contain indices in \[0, 8\].*got values in \[0, 9\]",
        ),
        (torch.tensor([-1, 2]), r"selected must contain indices in \[0, 8\].*\[-1, 2\]"),
        (torch.tensor([0.0, 1.0]), r"selected must have an integer dtype, got torch.float32"),
        (torch.tensor([2, 2, 3]), r"selected must not repeat indices, got 1 duplicates"),
    ],
)
def test_position_bias_rejects_bad_selections(selected, pattern):
    with pytest.raises(ValueError, match=pattern):
        position_bias(selected, VideoGrid(1, 3, 3))


def test_boundary_attention_mass_rejects_bad_attn():
    grid = VideoGrid(1, 3, 3)
    with pytest.raises(ValueError, match=r"attn must have a positive sum .*all zeros"):
        boundary_attention_mass(torch.zeros(9), grid)
    with pytest.raises(ValueError, match=r"attn must be non-negative"):
        boundary_attention_mass(-torch.ones(9), grid)
    with pytest.raises(ValueError, match=r"attn must have shape \[9\].*got \[8\]"):
        boundary_attention_mass(torch.ones(8), grid)
