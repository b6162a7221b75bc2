"""VideoGrid: flat order, coordinates, border ring and construction from video_grid_thw."""

from __future__ import annotations

import pytest
import torch

from hippo_vllm.core import VideoGrid


def test_sizes_and_equality_with_numpy_like_ints():
    grid = VideoGrid(4, 8, 6)
    assert (grid.num_tokens, grid.tokens_per_frame) == (192, 48)
    assert VideoGrid(torch.tensor(4).item(), 8, 6) == grid
    assert hash(VideoGrid(4, 8, 6)) == hash(grid)


def test_flat_order_is_t_major_then_row_then_column():
    grid = VideoGrid(3, 4, 5)
    flat = torch.arange(grid.num_tokens)
    # vLLM / EVS reshape the flat embeddings to (t, h, w, D): that view must agree.
    expected_t, expected_h, expected_w = torch.meshgrid(
        torch.arange(3), torch.arange(4), torch.arange(5), indexing="ij"
    )
    t, h, w = grid.coords(flat)
    assert torch.equal(t, expected_t.reshape(-1))
    assert torch.equal(h, expected_h.reshape(-1))
    assert torch.equal(w, expected_w.reshape(-1))
    assert torch.equal(grid.flat_index(t, h, w), flat)
    assert grid.flat_index(2, 3, 4) == grid.num_tokens - 1
    assert grid.flat_index(1, 0, 2) == 22
    assert torch.equal(grid.frame_of(flat), expected_t.reshape(-1))


def test_coords_of_scalar_and_out_of_range():
    grid = VideoGrid(2, 3, 3)
    assert [int(v) for v in grid.coords(13)] == [1, 1, 1]
    with pytest.raises(ValueError, match=r"flat must .*\[0, 17\].*18"):
        grid.coords(18)
    with pytest.raises(ValueError, match=r"flat must lie in \[0, 17\].*\[-1, 3\]"):
        grid.coords(torch.tensor([-1, 3]))
    with pytest.raises(ValueError, match=r"h must be an int in \[0, 2\].*3"):
        grid.flat_index(0, 3, 0)
    with pytest.raises(ValueError, match="w must be an integer tensor"):
        grid.flat_index(0, 0, torch.tensor([0.5]))


def test_boundary_mask_is_outer_ring_of_every_frame():
    grid = VideoGrid(2, 4, 5)
    mask = grid.boundary_mask().reshape(2, 4, 5)
    expected_frame = torch.tensor(
        [
            [1, 1, 1, 1, 1],
            [1, 0, 0, 0, 1],
            [1, 0, 0, 0, 1],
            [1, 1, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask[0], expected_frame) and torch.equal(mask[1], expected_frame)
    assert int(VideoGrid(1, 14, 14).boundary_mask().sum()) == 52  # 14*14 - 12*12 ring tokens
    assert bool(VideoGrid(3, 2, 7).boundary_mask().all())


def test_from_thw_merges_spatial_patches():
    assert VideoGrid.from_thw((64, 32, 32)) == VideoGrid(64, 16, 16)
    assert VideoGrid.from_thw(torch.tensor([[4, 16, 12]])) == VideoGrid(4, 8, 6)
    assert VideoGrid.from_thw([2, 9, 6], spatial_merge_size=3) == VideoGrid(2, 3, 2)


@pytest.mark.parametrize(
    ("grid_thw", "merge", "pattern"),
    [
        ((4, 15, 16), 2, r"divisible by spatial_merge_size=2.*H=15, W=16"),
        ((4, 16), 2, r"grid_thw must be a sequence of 3 ints.*\(4, 16\)"),
        ((4, 0, 16), 2, r"grid_thw entries must be positive.*\[4, 0, 16\]"),
        ((4.0, 16, 16), 2, r"grid_thw must contain ints"),
        (
            torch.tensor([[4, 16, 16], [4, 16, 16]]),
            2,
            r"grid_thw must be an integer tensor of shape \[3\].*\[2, 3\]",
        ),
        ((4, 16, 16), 0, r"spatial_merge_size must be a positive int, got 0"),
    ],
)
def test_from_thw_rejects_bad_input(grid_thw, merge, pattern):
    with pytest.raises(ValueError, match=pattern):
        VideoGrid.from_thw(grid_thw, spatial_merge_size=merge)


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        ((0, 4, 4), r"t must be a positive int, got 0"),
        ((2, -1, 4), r"h must be a positive int, got -1"),
        ((2, 4, 2.5), r"w must be a positive int, got 2.5"),
        ((True, 4, 4), r"t must be a positive int, got True"),
    ],
)
def test_constructor_rejects_non_positive_or_non_int(args, pattern):
    with pytest.raises(ValueError, match=pattern):
        VideoGrid(*args)
