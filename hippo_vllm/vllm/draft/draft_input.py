"""What one forward of the draft engine appends to one request's draft sequence (``DraftEngine.run``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DraftInput:
    """Rows to append to one request's draft sequence.

    positions: ``[3, n]`` int M-RoPE positions in the *original* (full-sequence)
        coordinates; text and generated tokens have three equal rows, and so
        has every row of a 1-D family (the draft's model gets the first row).
    token_ids: ``[n]`` ids, embedded with the draft's own token embedding, or
    inputs_embeds: ``[n, row_width]`` rows already embedded (e.g. a compact prompt
        with kept video rows, from ``DraftEngine.embed_prompt``); for a DeepStack
        draft each row carries its DeepStack features after its embedding.
    """

    req_id: str
    positions: torch.Tensor
    token_ids: torch.Tensor | None = None
    inputs_embeds: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if (self.token_ids is None) == (self.inputs_embeds is None):
            raise ValueError(f"DraftInput {self.req_id!r}: give exactly one of token_ids and inputs_embeds")
        rows = self.token_ids if self.token_ids is not None else self.inputs_embeds
        n = rows.shape[0]
        if n < 1:
            raise ValueError(f"DraftInput {self.req_id!r} has no rows")
        if self.positions.dim() != 2 or tuple(self.positions.shape) != (3, n):
            raise ValueError(
                f"DraftInput {self.req_id!r}: positions must be [3, {n}] M-RoPE positions, "
                f"got {tuple(self.positions.shape)}"
            )
        if self.token_ids is not None and self.token_ids.dim() != 1:
            raise ValueError(
                f"DraftInput {self.req_id!r}: token_ids must be 1-D, got {tuple(self.token_ids.shape)}"
            )
        if self.inputs_embeds is not None and self.inputs_embeds.dim() != 2:
            raise ValueError(
                f"DraftInput {self.req_id!r}: inputs_embeds must be [n, row_width], "
                f"got {tuple(self.inputs_embeds.shape)}"
            )

    @property
    def num_rows(self) -> int:
        return self.positions.shape[1]
