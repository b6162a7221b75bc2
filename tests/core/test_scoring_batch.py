"""The batched scores: several videos of one grid scored at once equal each video scored alone."""

from __future__ import annotations

import pytest
import torch

from hippo_vllm.core import (
    PRUNING_METHODS,
    VideoGrid,
    holistic_scores,
    holistic_scores_batch,
    select_tokens,
    select_tokens_batch,
    select_video_tokens,
    select_video_tokens_batch,
)
from hippo_vllm.core.visual_scores import EmbeddingFrames, temporal_scores_from_frames

# Small frames (the dense s_spa path), large frames (the windowed one), one frame (no s_temp).
GRIDS = [VideoGrid(4, 4, 4), VideoGrid(3, 9, 10), VideoGrid(1, 5, 6)]


def _videos(grid: VideoGrid, count: int, dtype=torch.float32, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    embeds = [torch.randn(grid.num_tokens, 24, generator=generator).to(dtype) for _ in range(count)]
    attn = [torch.rand(grid.num_tokens, generator=generator) for _ in range(count)]
    return embeds, attn


@pytest.mark.parametrize("grid", GRIDS, ids=str)
@pytest.mark.parametrize("with_attn", [True, False])
@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0), (0.0, 1.0, 0.0), (0.5, 0.0, 2.0)])
def test_batch_scores_equal_each_video_alone(grid, with_attn, weights):
    embeds, attn = _videos(grid, 3)
    attn = attn if with_attn else None
    if not with_attn and weights == (1.0, 0.0, 0.0):
        pytest.skip("no active signal")
    batch = holistic_scores_batch(embeds, grid, attn=attn, weights=weights)
    assert batch.shape == (3, grid.num_tokens)
    for index in range(3):
        alone = holistic_scores(embeds[index], grid, None if attn is None else attn[index], weights=weights)
        torch.testing.assert_close(batch[index], alone, rtol=0, atol=1e-6)


def test_batch_temporal_scores_stay_within_each_video():
    """A video's first frame compares with its own second frame, never with the video before it."""
    grid = VideoGrid(3, 4, 4)
    still, _ = _videos(grid, 1, seed=1)
    frame = still[0][: grid.tokens_per_frame]
    static = frame.repeat(grid.t, 1)  # every frame the same: s_temp 0 everywhere
    moving, _ = _videos(grid, 1, seed=2)
    stacked = EmbeddingFrames.from_embeds(torch.cat([moving[0], static]), VideoGrid(2 * grid.t, grid.h, grid.w))
    raw = temporal_scores_from_frames(stacked, frames_per_video=grid.t).reshape(2, -1)
    assert raw[1].abs().max() < 1e-5  # its first frame was not compared with the moving video's last
    assert torch.equal(raw[0], temporal_scores_from_frames(EmbeddingFrames.from_embeds(moving[0], grid)))


def test_bf16_batch_equals_each_video_alone():
    grid = GRIDS[0]
    embeds, attn = _videos(grid, 4, dtype=torch.bfloat16)
    batch = holistic_scores_batch(embeds, grid, attn=attn)
    for index in range(4):
        torch.testing.assert_close(batch[index], holistic_scores(embeds[index], grid, attn[index]), rtol=0,
                                   atol=1e-6)


@pytest.mark.parametrize("mode", ["global", "per_frame"])
def test_batch_selection_equals_each_row_alone(mode):
    grid = VideoGrid(3, 4, 5)
    scores = torch.rand(4, grid.num_tokens, generator=torch.Generator().manual_seed(3))
    scores[1, :7] = 0.5  # ties: the lower index wins in a row as alone
    chosen = select_tokens_batch(scores, grid, 0.25, mode=mode)
    for index in range(4):
        assert torch.equal(chosen[index], select_tokens(scores[index], grid, 0.25, mode=mode))


@pytest.mark.parametrize("pruning", [p for p in PRUNING_METHODS])
@pytest.mark.parametrize("selection", ["global", "per_frame"])
def test_batch_selection_of_every_method_equals_each_video_alone(pruning, selection):
    grid = VideoGrid(4, 4, 4)
    embeds, attn = _videos(grid, 3, seed=4)
    chosen = select_video_tokens_batch(pruning, grid, 0.1, video_embeds=embeds, attn=attn, selection=selection)
    assert len(chosen) == 3
    for index in range(3):
        alone = select_video_tokens(pruning, grid, 0.1, video_embeds=embeds[index], attn=attn[index],
                                    selection=selection)
        assert torch.equal(chosen[index], alone)


def test_batch_rejects_bad_input_naming_the_video():
    grid = GRIDS[0]
    embeds, attn = _videos(grid, 2)
    with pytest.raises(ValueError, match=r"attn\[1\] must have shape \[64\].*got \[63\]"):
        holistic_scores_batch(embeds, grid, attn=[attn[0], attn[1][:-1]])
    attn[0][5] = float("nan")
    with pytest.raises(ValueError, match="attn contains NaN at 1 of 128 tokens"):
        holistic_scores_batch(embeds, grid, attn=attn)
    with pytest.raises(ValueError, match="video_embeds lists 2 videos but attn 1"):
        holistic_scores_batch(embeds, grid, attn=attn[1:])
    with pytest.raises(ValueError, match="attn must list at least one video"):
        holistic_scores_batch(None, grid, attn=[], weights=(1.0, 0.0, 0.0))
    with pytest.raises(ValueError, match=r"scores must have shape \[B, 64\]"):
        select_tokens_batch(torch.rand(64), grid, 0.1)
