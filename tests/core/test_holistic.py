"""Per-frame normalisation, weight parsing and the fused holistic score."""

from __future__ import annotations

import importlib

import pytest
import torch

from hippo_vllm.core import (
    VideoGrid,
    holistic_scores,
    normalize_per_frame,
    parse_weights,
    position_bias,
    select_attention_topk,
    select_tokens,
    spatial_scores,
    temporal_scores,
)

from .synthetic_video import moving_object_video

holistic_module = importlib.import_module("hippo_vllm.core.holistic")


def test_normalize_per_frame_maps_each_frame_to_unit_range():
    grid = VideoGrid(3, 1, 4)
    scores = torch.tensor([1.0, 3.0, 2.0, 5.0, 10.0, 10.0, 10.0, 10.0, -2.0, 0.0, 2.0, -1.0])
    got = normalize_per_frame(scores, grid, eps=1e-6)
    expected = torch.tensor([0.0, 0.5, 0.25, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 1.0, 0.25])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert got.dtype == torch.float32
    assert torch.equal(got[4:8], torch.zeros(4))  # a constant frame becomes zeros, not NaN


def test_normalize_per_frame_accepts_integer_scores_and_rejects_bad_eps():
    grid = VideoGrid(1, 2, 2)
    torch.testing.assert_close(
        normalize_per_frame(torch.tensor([0, 2, 4, 1]), grid),
        torch.tensor([0.0, 0.5, 1.0, 0.25]),
        atol=1e-5,
        rtol=0,
    )
    with pytest.raises(ValueError, match=r"eps must be > 0, got 0.0"):
        normalize_per_frame(torch.zeros(4), grid, eps=0.0)
    with pytest.raises(ValueError, match=r"scores must have shape \[4\].*got \[5\]"):
        normalize_per_frame(torch.zeros(5), grid)


def test_parse_weights_forms():
    assert parse_weights((1, 0.5, 0)) == {"attn": 1.0, "temp": 0.5, "spa": 0.0}
    assert parse_weights({"spa": 2.0}) == {"attn": 1.0, "temp": 1.0, "spa": 2.0}


@pytest.mark.parametrize(
    ("weights", "pattern"),
    [
        ((1.0, 1.0), r"weights must have 3 entries \(attn, temp, spa\), got 2"),
        (
            {"attn": 1.0, "motion": 1.0},
            r"weights has unknown keys \['motion'\]; allowed keys are \['attn', 'temp', 'spa'\]",
        ),
        ((1.0, -0.5, 1.0), r"weights\['temp'\] must be >= 0, got -0.5"),
        ((1.0, 1.0, float("inf")), r"weights\['spa'\] must be a finite number >= 0, got inf"),
        ({"attn": float("nan")}, r"weights\['attn'\] must be a finite number >= 0, got nan"),
        ((1.0, True, 1.0), r"weights\['temp'\] must be a finite number >= 0, got True"),
        ("111", r"weights must be a 3-sequence \(attn, temp, spa\) or a mapping"),
        (1.0, r"weights must be a 3-sequence .*got 1.0"),
    ],
)
def test_parse_weights_rejects_bad_weights(weights, pattern):
    with pytest.raises(ValueError, match=pattern):
        parse_weights(weights)


def test_holistic_single_signal_equals_its_normalised_score():
    grid = VideoGrid(4, 6, 8)
    embeds = moving_object_video(grid, seed=1, changing_appearance=True)
    attn = torch.rand(grid.num_tokens, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        holistic_scores(embeds, grid, attn, weights=(2.0, 0, 0)),
        2 * normalize_per_frame(attn, grid),
    )
    torch.testing.assert_close(
        holistic_scores(embeds, grid, attn, weights={"attn": 0, "spa": 0}),
        normalize_per_frame(temporal_scores(embeds, grid), grid),
    )
    torch.testing.assert_close(
        holistic_scores(embeds, grid, None, weights=(5.0, 0, 1), crop=3),
        normalize_per_frame(spatial_scores(embeds, grid, crop=3), grid),
    )
    fused = holistic_scores(embeds, grid, attn)
    expected = sum(
        normalize_per_frame(s, grid)
        for s in (attn, temporal_scores(embeds, grid), spatial_scores(embeds, grid))
    )
    torch.testing.assert_close(fused, expected)


def test_zero_weight_signal_is_not_computed(monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("a disabled signal was computed")

    monkeypatch.setattr(holistic_module, "spatial_scores_from_frames", must_not_run)
    monkeypatch.setattr(holistic_module.EmbeddingFrames, "from_embeds", must_not_run)
    grid = VideoGrid(2, 3, 3)
    attn = torch.arange(grid.num_tokens, dtype=torch.float32)
    # temp and spa off: the embeddings are not even read, and may be omitted.
    torch.testing.assert_close(
        holistic_scores(None, grid, attn, weights=(1, 0, 0)), normalize_per_frame(attn, grid)
    )


def test_holistic_reduces_border_bias_of_attention_only_selection():
    # Attention is inflated on every frame's outer ring (position bias); the video's
    # information is a moving, changing object in the interior.
    grid = VideoGrid(8, 12, 12)
    embeds = moving_object_video(grid, dim=64, seed=2, top=5, left=1, changing_appearance=True)
    generator = torch.Generator().manual_seed(3)
    attn = 0.2 * torch.rand(grid.num_tokens, generator=generator) + grid.boundary_mask().float()
    attn = attn / attn.sum()

    attention_only = select_attention_topk(attn, grid, keep_ratio=0.1)
    holistic = select_tokens(holistic_scores(embeds, grid, attn), grid, keep_ratio=0.1)
    assert attention_only.numel() == holistic.numel() == 116
    bias_attention, bias_holistic = (
        position_bias(attention_only, grid),
        position_bias(holistic, grid),
    )
    assert bias_attention > 3.0  # nearly every kept token on the ring (max 144/44 ≈ 3.27)
    assert bias_holistic < bias_attention - 1.0


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"embeds": torch.zeros(17, 4)}, r"video_embeds must have shape \[16, D\].*got \[17, 4\]"),
        ({"attn": torch.zeros(15)}, r"attn must have shape \[16\].*got \[15\]"),
        ({"attn": torch.full((16,), float("nan"))}, r"attn contains NaN at 16 of 16 tokens"),
        ({"attn": torch.full((16,), float("inf"))}, r"attn contains inf"),
        ({"crop": 4}, r"crop must be an odd int >= 3 .*got 4"),
        ({"crop": 1}, r"crop must be an odd int >= 3 .*got 1"),
        ({"weights": (0, 0, 0)}, r"weights leave no active signal"),
        ({"weights": (1, 0, 0), "attn": None}, r"weights leave no active signal.*attn None"),
        ({"weights": (-1, 1, 1)}, r"weights\['attn'\] must be >= 0, got -1"),
        ({"embeds": None}, r"video_embeds is None but s_temp/s_spa are enabled"),
    ],
)
def test_holistic_rejects_bad_input(kwargs, pattern):
    grid = VideoGrid(1, 4, 4)
    args = {
        "embeds": torch.randn(16, 4),
        "attn": torch.rand(16),
        "weights": (1, 1, 1),
        "crop": 5,
    } | kwargs
    with pytest.raises(ValueError, match=pattern):
        holistic_scores(args["embeds"], grid, attn=args["attn"], weights=args["weights"], crop=args["crop"])
