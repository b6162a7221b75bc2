"""Geometry of one video's tokens as the language model sees them.

Qwen2.5-VL groups 2 sampled frames into one temporal patch and merges 2×2 ViT
patches into one LLM token, so a video becomes a grid of ``t`` token-frames of
``h × w`` tokens each. The post-merger embeddings (and the placeholder tokens in
the prompt) are laid out t-major, then row, then column; that is the order vLLM
uses when it scatters video embeddings and the order EVS assumes when it
reshapes them to ``(t, h, w, D)``. Every flat index in ``hippo_vllm.core``
refers to this order.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import overload

import torch

from hippo_vllm.core.validation import check_positive_int


@dataclass(frozen=True)
class VideoGrid:
    """LLM-side token grid of one video: ``t`` token-frames of ``h × w`` tokens."""

    t: int
    h: int
    w: int

    def __post_init__(self) -> None:
        # Normalise numpy/torch integer scalars to plain int so equality and
        # hashing behave like the obvious VideoGrid(4, 8, 8).
        for name in ("t", "h", "w"):
            object.__setattr__(self, name, check_positive_int(name, getattr(self, name)))

    @classmethod
    def from_thw(cls, grid_thw: Sequence[int] | torch.Tensor, spatial_merge_size: int = 2) -> VideoGrid:
        """Build the LLM token grid from the processor's ``video_grid_thw`` row.

        Args:
            grid_thw: ``(T_patches, H_patches, W_patches)`` of one video, as a
                sequence of 3 ints or a tensor of shape ``[3]`` or ``[1, 3]``.
                ``T_patches`` already counts temporal patches (2 frames each).
            spatial_merge_size: side of the patch merger's square window (2 for
                Qwen2.5-VL).

        Returns:
            ``VideoGrid(T, H // m, W // m)``.
        """
        merge = check_positive_int("spatial_merge_size", spatial_merge_size)
        if isinstance(grid_thw, torch.Tensor):
            if grid_thw.shape not in (torch.Size([3]), torch.Size([1, 3])) or grid_thw.is_floating_point():
                raise ValueError(
                    "grid_thw must be an integer tensor of shape [3] or [1, 3] "
                    "(one video's T, H, W patches), "
                    f"got shape {list(grid_thw.shape)} dtype {grid_thw.dtype}"
                )
            values = [int(v) for v in grid_thw.reshape(3).tolist()]
        else:
            if isinstance(grid_thw, (str, bytes)) or not isinstance(grid_thw, Sequence) or len(grid_thw) != 3:
                raise ValueError(f"grid_thw must be a sequence of 3 ints (T, H, W patches), got {grid_thw!r}")
            values = list(grid_thw)
            if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in values):
                raise ValueError(f"grid_thw must contain ints (T, H, W patches), got {grid_thw!r}")
        t_patches, h_patches, w_patches = (int(v) for v in values)
        if min(t_patches, h_patches, w_patches) < 1:
            raise ValueError(f"grid_thw entries must be positive, got {values}")
        if h_patches % merge or w_patches % merge:
            raise ValueError(
                f"grid_thw spatial sizes must be divisible by spatial_merge_size={merge}, "
                f"got H={h_patches}, W={w_patches} patches"
            )
        return cls(t_patches, h_patches // merge, w_patches // merge)

    @property
    def num_tokens(self) -> int:
        """Number of LLM video tokens, ``t * h * w``."""
        return self.t * self.h * self.w

    @property
    def tokens_per_frame(self) -> int:
        """Number of LLM tokens in one token-frame, ``h * w``."""
        return self.h * self.w

    @overload
    def flat_index(self, t: int, h: int, w: int) -> int: ...

    @overload
    def flat_index(
        self, t: int | torch.Tensor, h: int | torch.Tensor, w: int | torch.Tensor
    ) -> int | torch.Tensor: ...

    def flat_index(self, t, h, w):
        """Flat index ``t*h*w_ + h*w_ + w`` of token ``(t, h, w)``.

        Accepts ints (returns an int) or broadcastable integer tensors (returns
        an int64 tensor). Coordinates outside the grid raise.
        """
        self._check_coordinate("t", t, self.t)
        self._check_coordinate("h", h, self.h)
        self._check_coordinate("w", w, self.w)
        flat = (t * self.h + h) * self.w + w
        return flat.to(torch.int64) if isinstance(flat, torch.Tensor) else int(flat)

    def coords(self, flat: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inverse of :meth:`flat_index`: ``(t, h, w)`` int64 tensors shaped like ``flat``."""
        flat_tensor = self._check_flat(flat)
        frame = torch.div(flat_tensor, self.tokens_per_frame, rounding_mode="floor")
        within = flat_tensor - frame * self.tokens_per_frame
        row = torch.div(within, self.w, rounding_mode="floor")
        return frame, row, within - row * self.w

    def frame_of(self, flat: int | torch.Tensor) -> torch.Tensor:
        """Token-frame index (int64 tensor shaped like ``flat``) of each flat index."""
        return torch.div(self._check_flat(flat), self.tokens_per_frame, rounding_mode="floor")

    def boundary_mask(self) -> torch.Tensor:
        """Bool ``[num_tokens]``: True on the outer ring of every token-frame.

        The ring (row 0, row h-1, column 0, column w-1) is where attention-only
        pruning over-selects tokens (position bias, see :mod:`hippo_vllm.core.position_bias`).
        """
        ring = torch.zeros(self.h, self.w, dtype=torch.bool)
        ring[0, :] = True
        ring[-1, :] = True
        ring[:, 0] = True
        ring[:, -1] = True
        return ring.reshape(1, -1).expand(self.t, -1).reshape(-1)

    def _check_coordinate(self, name: str, value: int | torch.Tensor, size: int) -> None:
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() or value.dtype == torch.bool:
                raise ValueError(f"{name} must be an integer tensor, got dtype {value.dtype}")
            if value.numel() and (value.min() < 0 or value.max() >= size):
                raise ValueError(
                    f"{name} must lie in [0, {size - 1}] for {self}, got values in "
                    f"[{int(value.min())}, {int(value.max())}]"
                )
        elif isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < size:
            raise ValueError(f"{name} must be an int in [0, {size - 1}] for {self}, got {value!r}")

    def _check_flat(self, flat: int | torch.Tensor) -> torch.Tensor:
        self._check_coordinate("flat", flat, self.num_tokens)
        if isinstance(flat, torch.Tensor):
            return flat.to(torch.int64)
        return torch.tensor(int(flat), dtype=torch.int64)
