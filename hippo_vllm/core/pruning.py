"""One entry point that turns a pruning configuration into the draft's kept video tokens.

The serving layer calls :func:`select_video_tokens` once per video with whatever
it has (the draft's embeddings, the target's s_attn if captured) and the
user's ``pruning`` / ``selection`` / ``keep_ratio`` / ``score_weights`` /
``crop_size`` settings; the baselines exist so the same server can run the
ablations that compare HIPPO's score with simpler selections.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hippo_vllm.core.baselines import (
    select_attention_topk,
    select_specvlm,
    select_temporal,
    select_uniform,
)
from hippo_vllm.core.holistic import ScoreWeights, holistic_scores, holistic_scores_batch
from hippo_vllm.core.selection import SELECTION_MODES, select_tokens, select_tokens_batch
from hippo_vllm.core.validation import check_choice, check_crop, check_grid, check_keep_ratio
from hippo_vllm.core.video_grid import VideoGrid

PRUNING_METHODS = ("holistic", "attention", "uniform", "temporal", "specvlm", "none")
"""``holistic`` is HIPPO; the others are baselines (``none`` = the draft sees the whole video)."""

_NEEDS_ATTENTION = ("attention", "specvlm")


def select_video_tokens(
    pruning: str,
    grid: VideoGrid,
    keep_ratio: float,
    video_embeds: torch.Tensor | None = None,
    attn: torch.Tensor | None = None,
    weights: ScoreWeights = (1.0, 1.0, 1.0),
    crop: int = 5,
    selection: str = "global",
) -> torch.Tensor:
    """Kept video-token indices of one video for the draft.

    Args:
        pruning: one of :data:`PRUNING_METHODS`.
        grid: the video's token grid.
        keep_ratio: share of tokens to keep, in (0, 1] (ignored by ``none``).
        video_embeds: ``[grid.num_tokens, D]`` draft embeddings; required by
            ``temporal`` and by ``holistic`` unless its temp and spa weights are 0.
        attn: s_attn ``[grid.num_tokens]``; required by ``attention`` and
            ``specvlm``; optional for ``holistic`` (None = fuse temp + spa only).
        weights: holistic weights ``(attn, temp, spa)`` or a mapping.
        crop: s_spa window side (odd, >= 3), used by ``holistic``.
        selection: :data:`~hippo_vllm.core.selection.SELECTION_MODES` entry,
            used by ``holistic`` (baselines always select globally).

    Returns:
        int64 ascending flat indices into the video's tokens.
    """
    ratio, crop = _check_settings(pruning, grid, keep_ratio, selection, crop, attn is not None,
                                  video_embeds is not None)
    if pruning == "none":
        return torch.arange(grid.num_tokens, dtype=torch.int64)
    if pruning == "holistic":
        fused = holistic_scores(video_embeds, grid, attn=attn, weights=weights, crop=crop)
        return select_tokens(fused, grid, ratio, mode=selection)
    if pruning == "attention":
        return select_attention_topk(attn, grid, ratio)
    if pruning == "specvlm":
        return select_specvlm(attn, grid, ratio)
    if pruning == "temporal":
        return select_temporal(video_embeds, grid, ratio)
    return select_uniform(grid, ratio)


def select_video_tokens_batch(
    pruning: str,
    grid: VideoGrid,
    keep_ratio: float,
    video_embeds: Sequence[torch.Tensor] | None = None,
    attn: Sequence[torch.Tensor] | None = None,
    weights: ScoreWeights = (1.0, 1.0, 1.0),
    crop: int = 5,
    selection: str = "global",
) -> list[torch.Tensor]:
    """:func:`select_video_tokens` of several videos of one grid, in the same settings.

    ``video_embeds`` and ``attn`` list the videos' tensors (``attn`` for all or none).
    HIPPO's score runs once over all of them (:func:`holistic_scores_batch`), which
    on small videos costs about what one video costs; the baselines go one by one.
    """
    ratio, crop = _check_settings(pruning, grid, keep_ratio, selection, crop, attn is not None,
                                  video_embeds is not None)
    if pruning != "holistic":
        videos = len(attn) if attn is not None else len(video_embeds) if video_embeds is not None else 0
        if videos < 1:
            raise ValueError(f"pruning={pruning!r}: a batch needs video_embeds or attn to count its videos")
        return [select_video_tokens(pruning, grid, ratio, None if video_embeds is None else video_embeds[i],
                                    None if attn is None else attn[i], weights, crop, selection)
                for i in range(videos)]
    fused = holistic_scores_batch(video_embeds, grid, attn=attn, weights=weights, crop=crop)
    return list(select_tokens_batch(fused, grid, ratio, mode=selection).unbind(0))


def _check_settings(pruning: str, grid: VideoGrid, keep_ratio: float, selection: str, crop: int,
                    has_attn: bool, has_embeds: bool) -> tuple[float, int]:
    """The validated keep ratio and crop; raises on any bad setting or a missing input."""
    check_choice("pruning", pruning, PRUNING_METHODS)
    check_grid(grid)
    # Validate every setting even where the method ignores it, so a bad server
    # configuration fails on the first video rather than when the method changes.
    ratio = check_keep_ratio(keep_ratio)
    check_choice("selection", selection, SELECTION_MODES)
    crop = check_crop(crop)
    if pruning in _NEEDS_ATTENTION and not has_attn:
        raise ValueError(
            f"pruning={pruning!r} requires attention scores (attn = s_attn of the target's text→video "
            "attention), got attn=None; capture s_attn or choose 'holistic', 'uniform', 'temporal' or 'none'"
        )
    if pruning == "temporal" and not has_embeds:
        raise ValueError("pruning='temporal' requires video_embeds (the draft's video embeddings), got None")
    return ratio, crop
