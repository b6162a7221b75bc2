"""select_video_tokens: each pruning method routes to its selector, and misconfigurations fail early."""

from __future__ import annotations

import pytest
import torch

from hippo_vllm.core import (
    PRUNING_METHODS,
    SELECTION_MODES,
    VideoGrid,
    holistic_scores,
    select_attention_topk,
    select_specvlm,
    select_temporal,
    select_tokens,
    select_uniform,
    select_video_tokens,
)

GRID = VideoGrid(4, 5, 6)


@pytest.fixture
def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    embeds = torch.randn(GRID.num_tokens, 16, generator=generator)
    attn = torch.rand(GRID.num_tokens, generator=generator)
    return embeds, attn


def test_public_constants():
    assert PRUNING_METHODS == ("holistic", "attention", "uniform", "temporal", "specvlm", "none")
    assert SELECTION_MODES == ("global", "per_frame")


def test_each_method_matches_its_selector(inputs):
    embeds, attn = inputs
    expected = {
        "holistic": select_tokens(holistic_scores(embeds, GRID, attn), GRID, 0.1),
        "attention": select_attention_topk(attn, GRID, 0.1),
        "uniform": select_uniform(GRID, 0.1),
        "temporal": select_temporal(embeds, GRID, 0.1),
        "specvlm": select_specvlm(attn, GRID, 0.1),
        "none": torch.arange(GRID.num_tokens),
    }
    for pruning, kept in expected.items():
        got = select_video_tokens(pruning, GRID, 0.1, video_embeds=embeds, attn=attn)
        assert got.dtype == torch.int64
        assert torch.equal(got, kept), pruning


def test_holistic_options_are_forwarded(inputs):
    embeds, attn = inputs
    got = select_video_tokens(
        "holistic",
        GRID,
        0.2,
        video_embeds=embeds,
        attn=attn,
        weights={"temp": 0.0},
        crop=3,
        selection="per_frame",
    )
    fused = holistic_scores(embeds, GRID, attn, weights=(1.0, 0.0, 1.0), crop=3)
    assert torch.equal(got, select_tokens(fused, GRID, 0.2, mode="per_frame"))
    # Without s_attn the holistic score still works on temp + spa.
    without_attn = select_video_tokens("holistic", GRID, 0.2, video_embeds=embeds)
    assert torch.equal(without_attn, select_tokens(holistic_scores(embeds, GRID), GRID, 0.2))


@pytest.mark.parametrize(
    ("pruning", "kwargs", "pattern"),
    [
        ("attention", {"attn": None}, r"pruning='attention' requires attention scores .*attn=None"),
        ("specvlm", {"attn": None}, r"pruning='specvlm' requires attention scores"),
        ("temporal", {"video_embeds": None}, r"pruning='temporal' requires video_embeds"),
        ("holistic", {"video_embeds": None}, r"video_embeds is None but s_temp/s_spa are enabled"),
        (
            "random",
            {},
            r"pruning must be one of 'holistic', 'attention', 'uniform', 'temporal', 'specvlm', 'none'; "
            r"got 'random'",
        ),
        (
            "holistic",
            {"selection": "frame"},
            r"selection must be one of 'global', 'per_frame'; got 'frame'",
        ),
        ("none", {"keep_ratio": 1.5}, r"keep_ratio must be in \(0, 1\], got 1.5"),
        ("uniform", {"crop": 4}, r"crop must be an odd int >= 3 .*got 4"),
        ("holistic", {"weights": (1, 1)}, r"weights must have 3 entries"),
    ],
)
def test_misconfigurations_raise(inputs, pruning, kwargs, pattern):
    embeds, attn = inputs
    args = {"keep_ratio": 0.1, "video_embeds": embeds, "attn": attn} | kwargs
    keep_ratio = args.pop("keep_ratio")
    with pytest.raises(ValueError, match=pattern):
        select_video_tokens(pruning, GRID, keep_ratio, **args)
