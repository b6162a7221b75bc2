"""Argument checks shared by the scoring core.

Every public function of ``hippo_vllm.core`` validates its inputs up front so a
wrong shape or value fails with a ``ValueError`` that names the argument, shows
the offending value (or shape) and says what is allowed, instead of surfacing
later as a cryptic broadcasting error or a silently wrong selection.
"""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from hippo_vllm.core.video_grid import VideoGrid


def check_positive_int(name: str, value: object) -> int:
    """Return ``value`` as an int, or raise if it is not an integer >= 1.

    ``bool`` is rejected although it subclasses ``int``: ``True`` as a size is
    almost always a bug at the call site.
    """
    if type(value) is int and value >= 1:  # the common case, without the ABC checks below
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be a positive int, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def check_real(name: str, value: object) -> float:
    """Return ``value`` as a finite float, or raise (NaN, inf, bool, non-numbers)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    as_float = float(value)
    if not math.isfinite(as_float):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return as_float


def check_keep_ratio(keep_ratio: object) -> float:
    """Return ``keep_ratio`` as a float in (0, 1], or raise."""
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, numbers.Real):
        raise ValueError(
            f"keep_ratio must be a number in (0, 1], got {keep_ratio!r} ({type(keep_ratio).__name__})"
        )
    ratio = float(keep_ratio)
    # Written so that NaN fails the test too (every comparison with NaN is False).
    if not (0.0 < ratio <= 1.0):
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}")
    return ratio


def check_crop(crop: object) -> int:
    """Return the s_spa window size, an odd int >= 3, or raise."""
    if isinstance(crop, bool) or not isinstance(crop, numbers.Integral) or crop < 3 or crop % 2 == 0:
        raise ValueError(f"crop must be an odd int >= 3 (e.g. 3, 5, 7), got {crop!r}")
    return int(crop)


def check_choice(name: str, value: object, allowed: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``allowed``, or raise listing them."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value


def check_tensor(name: str, value: object) -> torch.Tensor:
    """Raise unless ``value`` is a ``torch.Tensor``."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_grid(grid: object) -> VideoGrid:
    """Raise unless ``grid`` is a :class:`~hippo_vllm.core.video_grid.VideoGrid`."""
    # Imported here because video_grid itself imports this module.
    from hippo_vllm.core.video_grid import VideoGrid

    if not isinstance(grid, VideoGrid):
        raise ValueError(
            "grid must be a VideoGrid (e.g. VideoGrid.from_thw(video_grid_thw)), "
            f"got {type(grid).__name__}: {grid!r}"
        )
    return grid


def check_score_vector(
    name: str,
    scores: object,
    grid: VideoGrid,
    *,
    allow_inf: bool = False,
    non_negative: bool = False,
) -> torch.Tensor:
    """Validate a per-token score vector of shape ``[grid.num_tokens]``.

    Real dtypes only (floating or integer, not bool/complex). NaN is always
    rejected because it makes every ranking arbitrary; ``±inf`` is rejected
    unless ``allow_inf`` (a ranking can cope with it, a min-max cannot).
    Returns the tensor unchanged.
    """
    check_grid(grid)
    tensor = check_tensor(name, scores)
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise ValueError(f"{name} must have a real dtype (floating or integer), got {tensor.dtype}")
    expected = (grid.num_tokens,)
    if tuple(tensor.shape) != expected:
        raise ValueError(
            f"{name} must have shape {list(expected)} (one score per video token of {grid}), "
            f"got {list(tensor.shape)}"
        )
    if tensor.is_floating_point():
        if torch.isnan(tensor).any():
            raise ValueError(
                f"{name} contains NaN at {int(torch.isnan(tensor).sum())} of {tensor.numel()} tokens"
            )
        if not allow_inf and torch.isinf(tensor).any():
            raise ValueError(
                f"{name} contains inf at {int(torch.isinf(tensor).sum())} of {tensor.numel()} tokens"
            )
    if non_negative and (tensor < 0).any():
        raise ValueError(f"{name} must be non-negative, got minimum {tensor.min().item()!r}")
    return tensor


def check_score_rows(name: str, scores: object, grid: VideoGrid) -> torch.Tensor:
    """Validate a list of finite score vectors of shape ``[grid.num_tokens]`` (one per video);
    returns them stacked, float32 ``[B, grid.num_tokens]`` (NaN and inf checked once, over all).
    A lone video's errors name it ``name``, as :func:`check_score_vector` does."""
    if isinstance(scores, torch.Tensor) or not isinstance(scores, (list, tuple)):
        raise ValueError(f"{name} must be a list of score tensors, one per video, got {type(scores).__name__}")
    for index, vector in enumerate(scores):
        label = name if len(scores) == 1 else f"{name}[{index}]"
        check_tensor(label, vector)
        if tuple(vector.shape) != (grid.num_tokens,) or vector.dtype == torch.bool or vector.is_complex():
            check_score_vector(label, vector, grid)  # raises, naming what is wrong
    if not scores:
        raise ValueError(f"{name} must list at least one video's scores, got an empty list")
    from hippo_vllm.core.video_grid import VideoGrid  # video_grid imports this module

    stacked = torch.stack([vector.to(torch.float32) for vector in scores])
    if not bool(torch.isfinite(stacked).all()):  # one check on the way that passes
        check_score_vector(name, stacked.reshape(-1), VideoGrid(len(scores) * grid.t, grid.h, grid.w))  # raises
    return stacked


def check_video_embeds(video_embeds: object, grid: VideoGrid) -> torch.Tensor:
    """Validate post-projector video embeddings of shape ``[grid.num_tokens, D]``.

    Any floating dtype is accepted (bf16 included); the scores convert to
    float32 themselves. Returns the tensor unchanged.
    """
    check_grid(grid)
    tensor = check_tensor("video_embeds", video_embeds)
    if not tensor.is_floating_point():
        raise ValueError(f"video_embeds must have a floating dtype, got {tensor.dtype}")
    if tensor.dim() != 2 or tensor.shape[0] != grid.num_tokens or tensor.shape[1] < 1:
        raise ValueError(
            f"video_embeds must have shape [{grid.num_tokens}, D] (num_tokens of {grid}, D >= 1), "
            f"got {list(tensor.shape)}"
        )
    return tensor
