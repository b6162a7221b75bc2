"""s_temp and s_spa: known answers on synthetic videos and naive loop references."""

from __future__ import annotations

import pytest
import torch

from hippo_vllm.core import VideoGrid, spatial_scores, temporal_scores

from .synthetic_video import flat_indices, moving_object_video, object_cells

TOP, LEFT = 2, 1


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def naive_temporal(embeds: torch.Tensor, grid: VideoGrid) -> torch.Tensor:
    frames = embeds.reshape(grid.t, grid.tokens_per_frame, -1)
    out = torch.zeros(grid.t, grid.tokens_per_frame, dtype=torch.float64)
    if grid.t == 1:
        return out.reshape(-1)
    for frame in range(grid.t):
        other = frame - 1 if frame > 0 else 1
        for position in range(grid.tokens_per_frame):
            out[frame, position] = 1.0 - cosine(frames[frame, position], frames[other, position])
    return out.reshape(-1)


def naive_spatial(embeds: torch.Tensor, grid: VideoGrid, crop: int) -> torch.Tensor:
    frames = embeds.reshape(grid.t, grid.h, grid.w, -1)
    radius = crop // 2
    out = torch.zeros(grid.t, grid.h, grid.w, dtype=torch.float64)
    for frame in range(grid.t):
        for row in range(grid.h):
            for col in range(grid.w):
                cosines = [
                    cosine(frames[frame, row, col], frames[frame, r, c])
                    for r in range(max(0, row - radius), min(grid.h, row + radius + 1))
                    for c in range(max(0, col - radius), min(grid.w, col + radius + 1))
                    if (r, c) != (row, col)
                ]
                if cosines:
                    values = torch.tensor(cosines, dtype=torch.float64)
                    out[frame, row, col] = ((values - values.mean()) ** 2).mean()
    return out.reshape(-1)


def test_temporal_ranks_changing_object_cells_first():
    # The object gets a new appearance each frame, so every cell it covers now or
    # covered in the previous frame changes; the static background does not.
    grid = VideoGrid(6, 8, 10)
    embeds = moving_object_video(grid, top=TOP, left=LEFT, changing_appearance=True)
    expected = set()
    for frame in range(grid.t):
        neighbour = frame - 1 if frame > 0 else 1  # frame 0 compares with frame 1
        cells = object_cells(frame, TOP, LEFT) + object_cells(neighbour, TOP, LEFT)
        expected |= flat_indices(grid, frame, cells)
    assert len(expected) == 6 * grid.t
    scores = temporal_scores(embeds, grid)
    top = set(torch.topk(scores, len(expected)).indices.tolist())
    assert top == expected
    background = torch.ones(grid.num_tokens, dtype=torch.bool)
    background[list(expected)] = False
    assert scores[background].abs().max() < 1e-5
    assert scores[list(expected)].min() > 0.5


def test_temporal_rigid_object_changes_only_at_leading_and_trailing_columns():
    # A rigid object shifted by one column covers its middle column in both frames.
    grid = VideoGrid(5, 6, 9)
    embeds = moving_object_video(grid, top=TOP, left=LEFT, changing_appearance=False)
    expected = set()
    for frame in range(grid.t):
        neighbour = frame - 1 if frame > 0 else 1
        now, before = set(object_cells(frame, TOP, LEFT)), set(object_cells(neighbour, TOP, LEFT))
        expected |= flat_indices(grid, frame, sorted(now ^ before))
    scores = temporal_scores(embeds, grid)
    assert set(torch.topk(scores, len(expected)).indices.tolist()) == expected
    assert sorted(scores.topk(len(expected) + 1).values.tolist())[0] < 1e-5


def test_temporal_matches_naive_reference_and_single_frame_is_zero():
    grid = VideoGrid(3, 3, 4)
    embeds = torch.randn(grid.num_tokens, 12, generator=torch.Generator().manual_seed(0))
    got = temporal_scores(embeds, grid)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), naive_temporal(embeds, grid), rtol=1e-5, atol=1e-6)
    single = VideoGrid(1, 3, 4)
    assert torch.equal(temporal_scores(embeds[:12], single), torch.zeros(12))


def test_spatial_flat_frame_is_zero_everywhere():
    grid = VideoGrid(2, 7, 7)
    vector = torch.randn(32, generator=torch.Generator().manual_seed(1))
    embeds = vector.expand(grid.num_tokens, 32).clone()
    assert spatial_scores(embeds, grid).abs().max() < 1e-10


def test_spatial_vertical_edge_scores_high_at_edge_columns_only():
    grid = VideoGrid(1, 12, 12)
    a = torch.zeros(16)
    a[0] = 1.0
    b = torch.zeros(16)
    b[1] = 5.0  # orthogonal to a; length is irrelevant for cosines
    frame = torch.empty(12, 12, 16)
    frame[:, :6] = a
    frame[:, 6:] = b
    scores = spatial_scores(frame.reshape(-1, 16), grid, crop=5).reshape(12, 12)
    # Columns more than 2 away from the a|b boundary (between 5 and 6) see one side only.
    assert scores[:, [0, 1, 2, 3, 8, 9, 10, 11]].abs().max() < 1e-10
    assert scores[:, 4:8].min() > 0.1
    # Interior row, column 5: 10 of its 24 neighbours are b (cos 0), 14 are a (cos 1);
    # population variance of that 0/1 mix is p(1 − p).
    p_same = 14 / 24
    assert float(scores[6, 5]) == pytest.approx(p_same * (1 - p_same), abs=1e-6)
    p_same_col4 = 19 / 24
    assert float(scores[6, 4]) == pytest.approx(p_same_col4 * (1 - p_same_col4), abs=1e-6)
    assert torch.allclose(scores[6, 6:8], scores[6, 4:6].flip(0), atol=1e-6)  # mirror symmetry


@pytest.mark.parametrize(
    ("grid", "crop"),
    # Small frames take the whole-cosine-matrix path, frames above 64 tokens the window's offsets.
    [(VideoGrid(2, 5, 7), 3), (VideoGrid(2, 6, 4), 5), (VideoGrid(1, 3, 2), 7), (VideoGrid(2, 9, 10), 5)],
)
def test_spatial_matches_naive_reference(grid, crop):
    embeds = torch.randn(grid.num_tokens, 8, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(
        spatial_scores(embeds, grid, crop=crop).double(),
        naive_spatial(embeds, grid, crop),
        rtol=1e-4,
        atol=1e-6,
    )


def test_spatial_token_without_neighbours_scores_zero():
    grid = VideoGrid(3, 1, 1)
    embeds = torch.randn(3, 4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(spatial_scores(embeds, grid), torch.zeros(3))


def test_bfloat16_embeddings_are_accepted():
    grid = VideoGrid(3, 4, 4)
    embeds = torch.randn(grid.num_tokens, 16, generator=torch.Generator().manual_seed(4)).bfloat16()
    for scores in (temporal_scores(embeds, grid), spatial_scores(embeds, grid)):
        assert scores.dtype == torch.float32
    torch.testing.assert_close(temporal_scores(embeds, grid), temporal_scores(embeds.float(), grid))


@pytest.mark.parametrize("crop", [4, 1, 2, True, 5.0])
def test_spatial_rejects_bad_crop(crop):
    grid = VideoGrid(1, 4, 4)
    with pytest.raises(ValueError, match=rf"crop must be an odd int >= 3 .*got {crop!r}"):
        spatial_scores(torch.zeros(16, 4), grid, crop=crop)


@pytest.mark.parametrize(
    ("embeds", "pattern"),
    [
        (torch.zeros(15, 4), r"video_embeds must have shape \[16, D\].*got \[15, 4\]"),
        (torch.zeros(16), r"video_embeds must have shape \[16, D\].*got \[16\]"),
        (
            torch.zeros(16, 4, dtype=torch.int32),
            r"video_embeds must have a floating dtype, got torch.int32",
        ),
        ([[0.0] * 4] * 16, r"video_embeds must be a torch.Tensor, got list"),
    ],
)
def test_scores_reject_embeddings_that_do_not_match_the_grid(embeds, pattern):
    grid = VideoGrid(1, 4, 4)
    for score in (temporal_scores, spatial_scores):
        with pytest.raises(ValueError, match=pattern):
            score(embeds, grid)


def test_scores_reject_a_non_grid():
    with pytest.raises(ValueError, match=r"grid must be a VideoGrid.*tuple"):
        temporal_scores(torch.zeros(16, 4), (1, 4, 4))
