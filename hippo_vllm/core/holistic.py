"""HIPPO's holistic token score: per-frame normalisation and weighted fusion.

    S(v_j^f) = w_attn·s̃_attn + w_temp·s̃_temp + w_spa·s̃_spa,
    s̃_k(v_j^f) = (s_k − min_f s_k) / (max_f s_k − min_f s_k + ε)   per token-frame f.

Normalising within each frame removes the inter-frame bias of raw attention
(frames close to the text get more of it) and puts the three signals on one
scale, while a global top-k over S still lets frames with more novel or
relevant content claim a larger share of the budget.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

import torch

from hippo_vllm.core.validation import (
    check_crop,
    check_real,
    check_score_rows,
    check_score_vector,
    check_video_embeds,
)
from hippo_vllm.core.video_grid import VideoGrid
from hippo_vllm.core.visual_scores import (
    EmbeddingFrames,
    spatial_scores_from_frames,
    temporal_scores_from_frames,
)

SIGNALS = ("attn", "temp", "spa")
"""Names of the three signals, in the order of a weight tuple."""

ScoreWeights = Sequence[float] | Mapping[str, float]


def normalize_per_frame(scores: torch.Tensor, grid: VideoGrid, eps: float = 1e-6) -> torch.Tensor:
    """Min-max normalise ``scores`` within each token-frame.

    Args:
        scores: ``[grid.num_tokens]`` finite real scores in flat (t, h, w) order.
        grid: the video's token grid.
        eps: added to each frame's range so a constant frame maps to zeros
            instead of dividing by zero.

    Returns:
        float32 ``[grid.num_tokens]`` in [0, 1).
    """
    check_score_vector("scores", scores, grid)
    eps = check_real("eps", eps)
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    return _normalized_frames(scores, grid.tokens_per_frame, eps)


def _normalized_frames(scores: torch.Tensor, tokens_per_frame: int, eps: float = 1e-6) -> torch.Tensor:
    """:func:`normalize_per_frame` of trusted scores, any number of frames (videos stacked, too)."""
    per_frame = scores.to(torch.float32).reshape(-1, tokens_per_frame)
    low = per_frame.amin(dim=1, keepdim=True)
    high = per_frame.amax(dim=1, keepdim=True)
    return ((per_frame - low) / (high - low + eps)).reshape(scores.shape)


def parse_weights(weights: ScoreWeights) -> dict[str, float]:
    """Turn a 3-sequence ``(attn, temp, spa)`` or a mapping into ``{"attn", "temp", "spa"} -> float``.

    A mapping may omit keys (they default to 1.0) but may not add unknown ones.
    Every weight must be finite and >= 0.
    """
    if isinstance(weights, Mapping):
        unknown = sorted(str(key) for key in weights if key not in SIGNALS)
        if unknown:
            raise ValueError(f"weights has unknown keys {unknown}; allowed keys are {list(SIGNALS)}")
        raw = {name: weights.get(name, 1.0) for name in SIGNALS}
    elif isinstance(weights, Sequence) and not isinstance(weights, (str, bytes)):
        if len(weights) != len(SIGNALS):
            raise ValueError(
                f"weights must have {len(SIGNALS)} entries (attn, temp, spa), got {len(weights)}: {weights!r}"
            )
        raw = dict(zip(SIGNALS, weights, strict=True))
    else:
        raise ValueError(
            f"weights must be a 3-sequence (attn, temp, spa) or a mapping with keys {list(SIGNALS)}, "
            f"got {weights!r}"
        )
    parsed = {}
    for name, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
            raise ValueError(f"weights[{name!r}] must be a finite number >= 0, got {value!r}")
        if value < 0:
            raise ValueError(f"weights[{name!r}] must be >= 0, got {value!r}")
        parsed[name] = float(value)
    return parsed


def holistic_scores(
    video_embeds: torch.Tensor | None,
    grid: VideoGrid,
    attn: torch.Tensor | None = None,
    weights: ScoreWeights = (1.0, 1.0, 1.0),
    crop: int = 5,
) -> torch.Tensor:
    """Fused per-token score S (higher = keep) for one video.

    Each active signal is min-max normalised per token-frame, then the signals
    are summed with their weights. A signal is active when its weight is > 0
    (and, for s_attn, when ``attn`` is given); inactive signals are not computed.

    Args:
        video_embeds: ``[grid.num_tokens, D]`` draft post-projector embeddings
            (any floating dtype); may be None only if s_temp and s_spa are off.
        grid: the video's token grid.
        attn: optional s_attn ``[grid.num_tokens]`` (e.g. from
            :func:`~hippo_vllm.core.attention_signal.attention_scores`); None
            disables the signal whatever its weight.
        weights: ``(w_attn, w_temp, w_spa)`` or a mapping with keys
            ``"attn"``, ``"temp"``, ``"spa"`` (missing keys default to 1.0).
        crop: odd window side M >= 3 of s_spa.

    Returns:
        float32 ``[grid.num_tokens]``.
    """
    return holistic_scores_batch(
        None if video_embeds is None else [video_embeds], grid,
        attn=None if attn is None else [attn], weights=weights, crop=crop,
    )[0]


def holistic_scores_batch(
    video_embeds: Sequence[torch.Tensor] | None,
    grid: VideoGrid,
    attn: Sequence[torch.Tensor] | None = None,
    weights: ScoreWeights = (1.0, 1.0, 1.0),
    crop: int = 5,
) -> torch.Tensor:
    """:func:`holistic_scores` of several videos of one grid at once: float32 ``[B, grid.num_tokens]``.

    Every score is per frame (s_temp compares frames of the same video only), so the
    videos are scored as one stack of frames: the same per-call work as one video,
    which is most of the cost of small videos. ``video_embeds`` and ``attn`` list the
    videos' tensors as :func:`holistic_scores` takes them (``attn`` for all or none).
    """
    parsed = parse_weights(weights)
    crop = check_crop(crop)
    if attn is not None:
        attn = check_score_rows("attn", attn, grid)
    else:
        parsed["attn"] = 0.0
    if all(weight == 0.0 for weight in parsed.values()):
        raise ValueError(
            f"weights leave no active signal (effective weights {parsed}, attn "
            f"{'given' if attn is not None else 'None'}); give at least one signal a weight > 0"
        )
    needs_embeds = parsed["temp"] > 0 or parsed["spa"] > 0
    if video_embeds is not None:
        for embeds in video_embeds:
            check_video_embeds(embeds, grid)
        if attn is not None and len(video_embeds) != attn.shape[0]:
            raise ValueError(f"video_embeds lists {len(video_embeds)} videos but attn {attn.shape[0]}")
    elif needs_embeds:
        raise ValueError(
            "video_embeds is None but s_temp/s_spa are enabled "
            f"(weights temp={parsed['temp']}, spa={parsed['spa']}); "
            "pass the embeddings or set both weights to 0"
        )
    videos = attn.shape[0] if attn is not None else len(video_embeds)
    if videos < 1:
        raise ValueError("holistic_scores_batch needs at least one video")
    device = attn.device if attn is not None else video_embeds[0].device
    fused = torch.zeros(videos, grid.num_tokens, dtype=torch.float32, device=device)
    frame = grid.tokens_per_frame
    if parsed["attn"] > 0:
        fused += parsed["attn"] * _normalized_frames(attn, frame)
    if needs_embeds:
        stacked = video_embeds[0] if videos == 1 else torch.cat(list(video_embeds))
        frames = EmbeddingFrames.from_embeds(stacked, VideoGrid(videos * grid.t, grid.h, grid.w))
        if parsed["temp"] > 0:
            temporal = temporal_scores_from_frames(frames, frames_per_video=grid.t)
            fused += parsed["temp"] * _normalized_frames(temporal, frame).reshape(videos, -1)
        if parsed["spa"] > 0:
            spatial = spatial_scores_from_frames(frames, crop)
            fused += parsed["spa"] * _normalized_frames(spatial, frame).reshape(videos, -1)
    return fused
