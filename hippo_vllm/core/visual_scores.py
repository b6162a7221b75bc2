"""s_temp and s_spa: local visual redundancy of each video token.

Both scores read only the draft's own post-projector video embeddings, so they
cost no target work. They are cosine statistics computed in float32 whatever
the input dtype (bf16 is fine); a zero embedding has cosine 0 with everything.

- s_temp (temporal): 1 − cos to the same spatial position in the previous
  token-frame. Static background scores ≈ 0, moving content scores high.
- s_spa (spatial): population variance of the cosines between a token and its
  neighbours in an M×M window. A uniform region has all cosines ≈ 1 and
  variance ≈ 0; an edge or textured structure has a spread of cosines.

Both are evaluated with shifted row-wise dot products, O(N·M²·D) time and no
N×N (or P×P) similarity matrix. Cosines are dot products scaled by inverse
norms computed once, so no normalised copy of the (up to ~230 MB) embeddings
is written, and the work runs over chunks of frames small enough to stay in
cache while all window offsets are processed; at D = 3584 both make the scores
several times faster than whole-tensor passes.
"""

from __future__ import annotations

import functools

from dataclasses import dataclass

import torch

from hippo_vllm.core.validation import check_crop, check_video_embeds
from hippo_vllm.core.video_grid import VideoGrid

_CHUNK_BYTES = 4 * 2**20
"""Float32 size of one chunk of frames (at least one frame) processed at a time on a CPU,
where a chunk that stays in cache is what pays."""

_ACCELERATOR_CHUNK_BYTES = 256 * 2**20
"""The same on a GPU, where kernel launches are what costs: with 4 MiB chunks a
64k-token video at D=3584 is one frame per chunk and ~30k small kernels (measured
on an H200: 310 ms per call; larger chunks cut the launches by the chunk factor)."""

_NORM_EPS = 1e-12

_DENSE_FRAME_TOKENS = 64
"""Frames of at most this many tokens get s_spa from their whole cosine matrix: (h·w)²
products instead of the window's 12·h·w (crop 5), but in one call instead of dozens."""


@dataclass(frozen=True)
class EmbeddingFrames:
    """Video embeddings viewed as frames, with the inverse L2 norms cosines need.

    ``frames`` is ``[t, h, w, D]`` in the caller's dtype (a view, no copy);
    ``inverse_norms`` is float32 ``[t, h, w]``. Build with :meth:`from_embeds`
    once and pass to both :func:`temporal_scores_from_frames` and
    :func:`spatial_scores_from_frames`.
    """

    frames: torch.Tensor
    inverse_norms: torch.Tensor

    @classmethod
    def from_embeds(cls, video_embeds: torch.Tensor, grid: VideoGrid) -> EmbeddingFrames:
        """Validate ``[grid.num_tokens, D]`` embeddings and view them as ``grid``'s frames."""
        embeds = check_video_embeds(video_embeds, grid)
        norms = torch.linalg.vector_norm(embeds, dim=-1, dtype=torch.float32)
        return cls(
            frames=embeds.reshape(grid.t, grid.h, grid.w, -1),
            inverse_norms=norms.clamp_min_(_NORM_EPS).reciprocal_().reshape(grid.t, grid.h, grid.w),
        )

    def frames_per_chunk(self) -> int:
        """Frames per processing chunk: as many as fit the device's chunk budget in float32, at least 1."""
        budget = _CHUNK_BYTES if self.frames.device.type == "cpu" else _ACCELERATOR_CHUNK_BYTES
        return max(1, budget // (4 * self.frames[0].numel()))

    def float_frames(self, start: int, stop: int) -> torch.Tensor:
        """Frames ``start:stop`` as float32 ``[stop-start, h, w, D]`` (a view when already float32)."""
        return self.frames[start:stop].to(torch.float32)


def temporal_scores(video_embeds: torch.Tensor, grid: VideoGrid) -> torch.Tensor:
    """s_temp: ``1 − cos(x_j^f, x_j^{f−1})`` for frames ``f ≥ 1`` (0-based).

    Frame 0 has no predecessor and compares with frame 1 instead (EVS's
    constant 255 for the first frame would become all zeros under the per-frame
    min-max normalisation). A single-frame video gets zeros.

    Args:
        video_embeds: ``[t·h·w, D]`` post-projector embeddings, any floating dtype.
        grid: the video's token grid.

    Returns:
        float32 ``[t·h·w]`` in [0, 2].
    """
    return temporal_scores_from_frames(EmbeddingFrames.from_embeds(video_embeds, grid))


def temporal_scores_from_frames(embedding_frames: EmbeddingFrames, frames_per_video: int | None = None) -> torch.Tensor:
    """s_temp of :class:`EmbeddingFrames`; float32 ``[t·h·w]``.

    ``frames_per_video``: the frames are several videos of that many frames each,
    stacked (each video's first frame compares with its own second one); None: one video.
    """
    inverse_norms = embedding_frames.inverse_norms
    num_frames = inverse_norms.shape[0]
    per_video = num_frames if frames_per_video is None else frames_per_video
    if per_video == 1:
        return torch.zeros(inverse_norms.numel(), dtype=torch.float32, device=inverse_norms.device)
    cos_to_previous = torch.empty_like(inverse_norms[1:])
    step = embedding_frames.frames_per_chunk()
    for start in range(1, num_frames, step):
        stop = min(num_frames, start + step)
        # One extra leading frame so every frame of the chunk has its predecessor.
        chunk = embedding_frames.float_frames(start - 1, stop)
        dots = (chunk[1:] * chunk[:-1]).sum(dim=-1)
        cos_to_previous[start - 1 : stop - 1] = (
            dots * inverse_norms[start:stop] * inverse_norms[start - 1 : stop - 1]
        )
    # Frame f compares with f-1, except a video's first frame, which takes its second frame's value.
    cos_per_frame = torch.cat([cos_to_previous[:1], cos_to_previous], dim=0)
    if per_video < num_frames:
        firsts = torch.arange(per_video, num_frames, per_video, device=inverse_norms.device)
        cos_per_frame[firsts] = cos_to_previous[firsts]
    dissimilarity = 1.0 - cos_per_frame
    # dot·(1/|a|)·(1/|b|) can overshoot ±1 by a float32 ulp; keep the documented range.
    return dissimilarity.clamp_(0.0, 2.0).reshape(-1)


def spatial_scores(video_embeds: torch.Tensor, grid: VideoGrid, crop: int = 5) -> torch.Tensor:
    """s_spa: population variance of ``cos(x_j, x_u)`` over the crop×crop neighbours ``u ≠ j``.

    The window is clipped at the frame border, so corner tokens have fewer
    neighbours; a token with no neighbour at all (1×1 frames) scores 0.

    Args:
        video_embeds: ``[t·h·w, D]`` post-projector embeddings, any floating dtype.
        grid: the video's token grid.
        crop: odd window side M >= 3 (default 5, i.e. 24 neighbours).

    Returns:
        float32 ``[t·h·w]``, >= 0.
    """
    crop = check_crop(crop)
    return spatial_scores_from_frames(EmbeddingFrames.from_embeds(video_embeds, grid), crop)


def spatial_scores_from_frames(embedding_frames: EmbeddingFrames, crop: int) -> torch.Tensor:
    """s_spa of :class:`EmbeddingFrames`; float32 ``[t·h·w]``. ``crop`` must be validated (odd, >= 3)."""
    inverse_norms = embedding_frames.inverse_norms
    num_frames, height, width = inverse_norms.shape
    device = inverse_norms.device
    if height * width <= _DENSE_FRAME_TOKENS:
        return _spatial_scores_dense(embedding_frames, crop)
    offsets, valid, neighbour_count = _window_layout(height, width, crop, device)
    # cosines[k, 0/1] hold cos(x_j, x_{j+offset_k}) and cos(x_j, x_{j-offset_k}); the
    # second is the first shifted back, because cosine is symmetric. This halves the
    # dot products: only (M²−1)/2 offsets are multiplied out.
    cosines = torch.zeros(len(offsets), 2, num_frames, height, width, dtype=torch.float32, device=device)
    step = embedding_frames.frames_per_chunk()
    for start in range(0, num_frames, step):
        # All offsets run on one cache-resident chunk before moving to the next.
        chunk = embedding_frames.float_frames(start, start + step)
        chunk_norms = inverse_norms[start : start + step]
        for index, (d_row, d_col) in enumerate(offsets):
            dots = (
                _window(chunk, d_row, d_col, anchor=True) * _window(chunk, d_row, d_col, anchor=False)
            ).sum(dim=-1)
            cos = (
                dots
                * _window(chunk_norms, d_row, d_col, anchor=True)
                * _window(chunk_norms, d_row, d_col, anchor=False)
            )
            _window(cosines[index, 0, start : start + step], d_row, d_col, anchor=True).copy_(cos)
            _window(cosines[index, 1, start : start + step], d_row, d_col, anchor=False).copy_(cos)

    cosines = cosines.reshape(-1, num_frames, height, width)
    safe_count = neighbour_count.clamp_min(1.0)
    mean = (cosines * valid).sum(dim=0) / safe_count
    # Two-pass variance: cosines of a flat region are all ≈ 1, where E[c²] − E[c]²
    # would cancel catastrophically in float32.
    variance = (((cosines - mean) * valid) ** 2).sum(dim=0) / safe_count
    variance = torch.where(neighbour_count > 0, variance, torch.zeros_like(variance))
    return variance.reshape(-1)


def _spatial_scores_dense(embedding_frames: EmbeddingFrames, crop: int) -> torch.Tensor:
    """s_spa of small frames from each frame's whole cosine matrix: one batched product
    instead of a loop over the window's offsets, whose per-call costs dominate there."""
    inverse_norms = embedding_frames.inverse_norms
    num_frames, height, width = inverse_norms.shape
    tokens = height * width
    unit = embedding_frames.float_frames(0, num_frames).reshape(num_frames, tokens, -1) * inverse_norms.reshape(
        num_frames, tokens, 1)
    cosines = torch.bmm(unit, unit.transpose(1, 2))  # [t, hw, hw]
    neighbours = _window_mask(height, width, crop, inverse_norms.device)  # [hw, hw], self excluded
    count = neighbours.sum(dim=-1)
    safe_count = count.clamp_min(1.0)
    mean = (cosines * neighbours).sum(dim=-1) / safe_count
    variance = (((cosines - mean.unsqueeze(-1)) * neighbours) ** 2).sum(dim=-1) / safe_count
    variance = torch.where(count > 0, variance, torch.zeros_like(variance))
    return variance.reshape(-1)


@functools.lru_cache(maxsize=64)
def _window_mask(height: int, width: int, crop: int, device: torch.device) -> torch.Tensor:
    """float ``[hw, hw]``: 1 where token ``u`` lies in token ``j``'s crop window, ``u ≠ j``."""
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    radius = crop // 2
    near = ((rows[:, None] - rows[None, :]).abs() <= radius) & ((cols[:, None] - cols[None, :]).abs() <= radius)
    near.fill_diagonal_(False)
    return near.to(torch.float32)


@functools.lru_cache(maxsize=64)
def _window_layout(height: int, width: int, crop: int, device: torch.device):
    """The offsets of a frame's window pairs, which positions each pair covers (float
    ``[2·K, 1, h, w]``) and each position's neighbour count: the same for every video of
    a grid, so built once (a video is scored once per request; the frames are small)."""
    offsets = [
        (d_row, d_col)
        for d_row, d_col in _half_window_offsets(crop // 2)
        if d_row < height and abs(d_col) < width  # otherwise the neighbour is outside every frame
    ]
    valid = torch.zeros(len(offsets), 2, height, width, dtype=torch.bool, device=device)
    for index, (d_row, d_col) in enumerate(offsets):
        _window(valid[index, 0], d_row, d_col, anchor=True, frame_dim=False).fill_(True)
        _window(valid[index, 1], d_row, d_col, anchor=False, frame_dim=False).fill_(True)
    valid = valid.reshape(-1, 1, height, width).to(torch.float32)
    return offsets, valid, valid.sum(dim=0)


def _half_window_offsets(radius: int) -> list[tuple[int, int]]:
    """One offset of each ± pair in the (2r+1)² window: rows below, or same row to the right."""
    return [
        (d_row, d_col)
        for d_row in range(0, radius + 1)
        for d_col in range(-radius, radius + 1)
        if d_row > 0 or d_col > 0
    ]


def _window(
    frames: torch.Tensor, d_row: int, d_col: int, *, anchor: bool, frame_dim: bool = True
) -> torch.Tensor:
    """View of the positions ``j`` (anchor) or ``j + (d_row, d_col)`` for which both lie in the frame.

    ``frames`` is ``[t, h, w, ...]`` (or ``[h, w, ...]`` with ``frame_dim=False``).
    """
    height, width = (frames.shape[1], frames.shape[2]) if frame_dim else (frames.shape[0], frames.shape[1])
    row_start = 0 if anchor else d_row
    col_start = max(0, -d_col) if anchor else max(0, d_col)
    rows = slice(row_start, row_start + height - d_row)
    cols = slice(col_start, col_start + width - abs(d_col))
    return frames[:, rows, cols] if frame_dim else frames[rows, cols]
