"""Top-k selection of the video tokens the draft keeps.

The kept indices are returned sorted ascending, i.e. in the original token
order, because the draft's sequence is ``text-before, kept video tokens,
text-after`` and each kept token keeps its original M-RoPE position.

Ties are broken by a stable descending sort, so among equal scores the lower
flat index wins and the result is reproducible across runs and devices (EVS
uses the same rule).
"""

from __future__ import annotations

import math

import torch

from hippo_vllm.core.validation import (
    check_choice,
    check_keep_ratio,
    check_positive_int,
    check_score_vector,
)
from hippo_vllm.core.video_grid import VideoGrid

SELECTION_MODES = ("global", "per_frame")
"""``global``: one top-k over the whole video; ``per_frame``: the same quota in every token-frame."""

_RATIO_SLACK = 1e-9
"""Absorbs float error in keep_ratio·N (0.1·30 = 3.0000000000000004 must keep 3, not 4)."""


def num_kept(num_tokens: int, keep_ratio: float) -> int:
    """Number of tokens kept out of ``num_tokens``: ``max(1, ceil(keep_ratio · num_tokens))``.

    At least one token always survives so the draft still sees the video.
    """
    num_tokens = check_positive_int("num_tokens", num_tokens)
    ratio = check_keep_ratio(keep_ratio)
    return max(1, math.ceil(ratio * num_tokens - _RATIO_SLACK))


def select_tokens(
    scores: torch.Tensor,
    grid: VideoGrid,
    keep_ratio: float,
    mode: str = "global",
) -> torch.Tensor:
    """Indices of the highest-scoring video tokens.

    Args:
        scores: ``[grid.num_tokens]`` real scores (higher = keep); no NaN.
        grid: the video's token grid.
        keep_ratio: share of tokens to keep, in (0, 1].
        mode: ``"global"`` keeps ``num_kept(N, keep_ratio)`` tokens over the
            whole video; ``"per_frame"`` keeps ``num_kept(h·w, keep_ratio)``
            tokens in every frame (``t`` times that in total).

    Returns:
        int64 ``[K]`` flat indices, sorted ascending.
    """
    check_score_vector("scores", scores, grid, allow_inf=True)
    return select_tokens_batch(scores.unsqueeze(0), grid, keep_ratio, mode)[0]


def select_tokens_batch(scores: torch.Tensor, grid: VideoGrid, keep_ratio: float, mode: str = "global") -> torch.Tensor:
    """:func:`select_tokens` of several videos of one grid: ``scores`` ``[B, grid.num_tokens]``
    (trusted, as :func:`~hippo_vllm.core.holistic.holistic_scores_batch` returns them),
    int64 ``[B, K]``, each row ascending."""
    ratio = check_keep_ratio(keep_ratio)
    check_choice("mode", mode, SELECTION_MODES)
    if scores.dim() != 2 or scores.shape[1] != grid.num_tokens:
        raise ValueError(f"scores must have shape [B, {grid.num_tokens}] (B videos of {grid}), "
                         f"got {list(scores.shape)}")
    if mode == "global":
        return top_k_indices(scores, num_kept(grid.num_tokens, ratio))
    quota = num_kept(grid.tokens_per_frame, ratio)
    per_frame = scores.reshape(scores.shape[0], grid.t, grid.tokens_per_frame)
    order = torch.sort(per_frame, dim=-1, descending=True, stable=True).indices[..., :quota]
    frame_starts = torch.arange(grid.t, dtype=torch.int64, device=scores.device).unsqueeze(1)
    frame_starts *= grid.tokens_per_frame
    return torch.sort((order + frame_starts).reshape(scores.shape[0], -1), dim=-1).values


def top_k_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Ascending int64 indices of the ``k`` largest entries of ``scores`` along its last dimension
    (lower index wins ties; each row of a 2-D ``scores`` on its own).

    Inputs are trusted (callers validate); ``torch.topk`` is avoided because
    its tie order is unspecified.
    """
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.sort(order, dim=-1).values
