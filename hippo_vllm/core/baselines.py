"""Baseline token selectors for ablations.

Every selector keeps exactly ``num_kept(N, keep_ratio)`` tokens and returns
their flat indices as sorted int64, so all methods are compared at the same
budget. (SpecVLM itself keeps ``int(N·(1 − drop_rate))``, which can differ from
our ``ceil`` by one token; the shared count is deliberate.)
"""

from __future__ import annotations

import torch

from hippo_vllm.core.selection import num_kept, top_k_indices
from hippo_vllm.core.validation import check_grid, check_keep_ratio, check_real, check_score_vector
from hippo_vllm.core.video_grid import VideoGrid
from hippo_vllm.core.visual_scores import temporal_scores


def select_attention_topk(attn: torch.Tensor, grid: VideoGrid, keep_ratio: float) -> torch.Tensor:
    """Top-k of raw s_attn over the whole video (attention-only pruning).

    Args:
        attn: s_attn ``[grid.num_tokens]``, finite.
        grid: the video's token grid.
        keep_ratio: share of tokens to keep, in (0, 1].

    Returns:
        int64 ``[K]`` ascending flat indices.
    """
    check_score_vector("attn", attn, grid)
    return top_k_indices(attn, num_kept(grid.num_tokens, keep_ratio))


def select_uniform(grid: VideoGrid, keep_ratio: float) -> torch.Tensor:
    """``K`` positions evenly spaced over the flat order, including both ends.

    Index ``i`` of ``K`` is ``round(i·(N−1)/(K−1))`` (halves rounded up),
    computed in exact integer arithmetic; consecutive picks are at least one
    apart, so the result is unique. ``K = 1`` keeps index 0.

    Returns:
        int64 ``[K]`` ascending flat indices.
    """
    check_grid(grid)
    return _evenly_spaced(grid.num_tokens, num_kept(grid.num_tokens, keep_ratio), rounding="nearest")


def select_temporal(video_embeds: torch.Tensor, grid: VideoGrid, keep_ratio: float) -> torch.Tensor:
    """EVS-like pruning: top-k of s_temp (tokens that changed most since the previous frame).

    Unlike vLLM's EVS, frame 0 is not force-kept: it is scored against frame 1
    (see :func:`~hippo_vllm.core.visual_scores.temporal_scores`).

    Args:
        video_embeds: ``[grid.num_tokens, D]`` post-projector embeddings.
        grid: the video's token grid.
        keep_ratio: share of tokens to keep, in (0, 1].

    Returns:
        int64 ``[K]`` ascending flat indices.
    """
    check_keep_ratio(keep_ratio)
    return top_k_indices(temporal_scores(video_embeds, grid), num_kept(grid.num_tokens, keep_ratio))


def select_specvlm(attn: torch.Tensor, grid: VideoGrid, keep_ratio: float, mass: float = 0.4) -> torch.Tensor:
    """SpecVLM's two-stage pruning (``drop_visual_tokens_specvlm`` with ``percentage=mass``).

    Stage I takes the smallest prefix of the descending attention order whose
    cumulative attention reaches ``mass · Σ attn`` (at least one token), capped
    at ``K``. Stage II spreads the remaining ``K − K_I`` picks evenly over the
    not-yet-selected positions in flat order, ``linspace(0, R−1, K−K_I)``
    truncated to integers (computed exactly, where SpecVLM's float32 linspace
    could collide on long videos).

    Args:
        attn: s_attn ``[grid.num_tokens]``, finite and non-negative.
        grid: the video's token grid.
        keep_ratio: share of tokens to keep, in (0, 1].
        mass: share of the total attention stage I must cover, in [0, 1].

    Returns:
        int64 ``[K]`` ascending flat indices.
    """
    check_score_vector("attn", attn, grid, non_negative=True)
    budget = num_kept(grid.num_tokens, keep_ratio)
    mass = check_real("mass", mass)
    if not 0.0 <= mass <= 1.0:
        raise ValueError(f"mass must be in [0, 1], got {mass!r}")

    order = torch.sort(attn, descending=True, stable=True).indices
    cumulative = torch.cumsum(attn[order].to(torch.float64), dim=0)
    target = mass * float(cumulative[-1])
    # searchsorted(left) gives the first position whose cumulative sum reaches the
    # target; +1 turns it into a count. Float error can leave the target unreached
    # (mass = 1), in which case every token qualifies, as in SpecVLM's loop.
    target_tensor = torch.tensor([target], dtype=torch.float64, device=cumulative.device)
    reach = int(torch.searchsorted(cumulative, target_tensor).item())
    heavy = order[: min(reach + 1, grid.num_tokens, budget)]

    available = torch.ones(grid.num_tokens, dtype=torch.bool, device=attn.device)
    available[heavy] = False
    remaining_positions = torch.nonzero(available).reshape(-1)
    fill = _evenly_spaced(remaining_positions.numel(), budget - heavy.numel(), rounding="truncate")
    fill = fill.to(remaining_positions.device)
    return torch.sort(torch.cat([heavy, remaining_positions[fill]])).values


def _evenly_spaced(length: int, count: int, *, rounding: str) -> torch.Tensor:
    """``count`` indices of ``linspace(0, length−1, count)`` rounded to integers, exactly.

    ``rounding="nearest"`` rounds halves up, ``"truncate"`` floors (values are
    non-negative). Requires ``count <= length``; ``count = 0`` gives an empty tensor.
    """
    if count == 0:
        return torch.zeros(0, dtype=torch.int64)
    if count == 1:
        return torch.zeros(1, dtype=torch.int64)
    steps = torch.arange(count, dtype=torch.int64) * (length - 1)
    if rounding == "nearest":
        return torch.div(2 * steps + (count - 1), 2 * (count - 1), rounding_mode="floor")
    return torch.div(steps, count - 1, rounding_mode="floor")
