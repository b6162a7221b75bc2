"""Position-bias metrics: how much a selection or an attention map favours frame borders.

Attention-only pruning is reported to over-select tokens on
the outer ring of each frame, which carry little semantics. Two measures:

- boundary selection ratio (BSR) = (share of the kept tokens on the ring)
  / (share of all tokens on the ring); 1.0 = no bias, > 1 = ring favoured.
- boundary attention mass = share of the s_attn mass that falls on the ring,
  to compare with the ring's token share ``|ring| / N``.
"""

from __future__ import annotations

import torch

from hippo_vllm.core.validation import check_grid, check_score_vector, check_tensor
from hippo_vllm.core.video_grid import VideoGrid


def position_bias(selected: torch.Tensor, grid: VideoGrid) -> float:
    """Boundary selection ratio of the kept tokens ``selected``.

    Args:
        selected: 1-D integer tensor of distinct flat indices in ``[0, N)``, non-empty.
        grid: the video's token grid.

    Returns:
        BSR as a float; 1.0 when the ring is the whole frame (h <= 2 or w <= 2),
        where "border" carries no information.
    """
    check_grid(grid)
    check_tensor("selected", selected)
    if selected.dim() != 1 or selected.numel() == 0:
        raise ValueError(f"selected must be a non-empty 1-D index tensor, got shape {list(selected.shape)}")
    if selected.is_floating_point() or selected.is_complex() or selected.dtype == torch.bool:
        raise ValueError(f"selected must have an integer dtype, got {selected.dtype}")
    low, high = int(selected.min()), int(selected.max())
    if low < 0 or high >= grid.num_tokens:
        raise ValueError(
            f"selected must contain indices in [0, {grid.num_tokens - 1}] for {grid}, "
            f"got values in [{low}, {high}]"
        )
    duplicates = selected.numel() - torch.unique(selected).numel()
    if duplicates:
        raise ValueError(f"selected must not repeat indices, got {duplicates} duplicates")
    ring = grid.boundary_mask().to(selected.device)
    ring_share = ring.sum().item() / grid.num_tokens
    if ring_share == 1.0:
        return 1.0
    selected_on_ring = ring[selected.to(torch.int64)].sum().item() / selected.numel()
    return selected_on_ring / ring_share


def boundary_attention_mass(attn: torch.Tensor, grid: VideoGrid) -> float:
    """Share of the attention mass on the frame rings, ``Σ_ring attn / Σ attn``.

    Args:
        attn: s_attn ``[grid.num_tokens]``, finite, non-negative, not all zero.
        grid: the video's token grid.

    Returns:
        a float in [0, 1]; compare with ``grid.boundary_mask().float().mean()``.
    """
    check_score_vector("attn", attn, grid, non_negative=True)
    total = attn.to(torch.float64).sum().item()
    if total <= 0:
        raise ValueError("attn must have a positive sum to define an attention share, got all zeros")
    return attn.to(torch.float64)[grid.boundary_mask().to(attn.device)].sum().item() / total
