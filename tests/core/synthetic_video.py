"""Synthetic video embeddings whose score rankings are known in advance.

A static, smoothly varying background (identical in every frame, so s_temp is 0
there) plus one 2×2-token object that moves one column per frame. Object
vectors are random Gaussians in D dimensions, hence nearly orthogonal to the
background and to each other.
"""

from __future__ import annotations

import math

import torch

from hippo_vllm.core import VideoGrid


def smooth_background(grid: VideoGrid, dim: int, generator: torch.Generator) -> torch.Tensor:
    """``[h, w, dim]`` field: a shared offset plus low-frequency waves with random vector amplitudes.

    Neighbouring tokens have cosine close to (but below) 1, like a textured but
    uniform scene.
    """
    rows = torch.arange(grid.h, dtype=torch.float32).reshape(-1, 1, 1)
    cols = torch.arange(grid.w, dtype=torch.float32).reshape(1, -1, 1)
    field = 2.0 * torch.randn(dim, generator=generator).expand(grid.h, grid.w, dim).clone()
    for _ in range(3):
        freq_r, freq_c, phase = (
            torch.rand(3, generator=generator) * torch.tensor([0.5, 0.5, 2 * math.pi])
        ).tolist()
        amplitude = 0.5 * torch.randn(dim, generator=generator)
        field += torch.cos(freq_r * rows + freq_c * cols + phase) * amplitude
    return field


def object_cells(frame: int, top: int, left: int) -> list[tuple[int, int]]:
    """(row, col) cells of the 2×2 object in ``frame``; it moves one column right per frame."""
    return [(top + d_row, left + frame + d_col) for d_row in (0, 1) for d_col in (0, 1)]


def moving_object_video(
    grid: VideoGrid,
    dim: int = 64,
    seed: int = 0,
    top: int = 2,
    left: int = 1,
    changing_appearance: bool = False,
) -> torch.Tensor:
    """``[grid.num_tokens, dim]`` embeddings: static background + moving 2×2 object.

    With ``changing_appearance`` the object gets a fresh random vector every
    frame (a spinning or deforming object), so every cell it covers in two
    consecutive frames changes; otherwise it is rigid and the column it covers
    in both frames does not change.
    """
    if left + grid.t + 1 > grid.w or top + 2 > grid.h:
        raise ValueError(f"object path does not fit in {grid}")
    generator = torch.Generator().manual_seed(seed)
    background = smooth_background(grid, dim, generator)
    frames = background.expand(grid.t, grid.h, grid.w, dim).clone()
    rigid_object = 3.0 * torch.randn(dim, generator=generator)
    for frame in range(grid.t):
        appearance = 3.0 * torch.randn(dim, generator=generator) if changing_appearance else rigid_object
        for row, col in object_cells(frame, top, left):
            frames[frame, row, col] = appearance
    return frames.reshape(grid.num_tokens, dim)


def flat_indices(grid: VideoGrid, frame: int, cells: list[tuple[int, int]]) -> set[int]:
    """Flat indices of ``cells`` in ``frame``."""
    return {grid.flat_index(frame, row, col) for row, col in cells}
