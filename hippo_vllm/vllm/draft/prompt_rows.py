"""What a prompt's draft input rows are made of: token ids, and each item's embeddings at its placeholder rows.

``DraftEngine.embed_prompts`` embeds several prompts' rows in one call of the
model's ``embed_input_ids``: the token lookup and the merge of item embeddings are
row by row, so one call over the prompts' rows laid end to end gives each prompt
exactly the rows it gets alone, for one call's per-call cost instead of one per
prompt. This module works out, per prompt, the rows that call takes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class PromptToEmbed:
    """One prompt whose draft input rows are wanted (``DraftEngine.embed_prompts``)."""

    token_ids: torch.Tensor  # [P] the prompt's token ids
    mm_features: list[Any]  # its multimodal items (vLLM MultiModalFeatureSpec)
    item_embeds: list[torch.Tensor]  # the draft encoder's output per item, in mm_features order
    rows: torch.Tensor | None = None  # ascending prompt rows to embed (a view's kept rows); None: all


@dataclasses.dataclass(frozen=True)
class MergeInputs:
    """The arguments of ``embed_input_ids`` for one prompt's rows."""

    ids: torch.Tensor  # [N] token ids of the rows, on the draft's device
    item_rows: list[torch.Tensor]  # the embeddings of the multimodal rows, in row order (device)
    is_mm: torch.Tensor  # [N] bool on the host: rows that take an item embedding

    @property
    def num_rows(self) -> int:
        return int(self.ids.shape[0])


def merge_inputs(prompt: PromptToEmbed, device: torch.device) -> MergeInputs:
    """Each item's embeddings at its placeholder rows (``mm_position``; only rows with
    ``is_embed`` when it is set), the rest token ids; only ``prompt.rows`` when given, so a
    pruned view of a long video never materialises the whole prompt's rows.

    Raises ValueError, naming the item, when the items do not fit the prompt.
    """
    ids = prompt.token_ids.to(device, torch.int64)
    rows = prompt.rows
    if not prompt.mm_features:
        if rows is not None:
            ids = ids[rows.to(device)]
        return MergeInputs(ids, [], torch.zeros(ids.shape[0], dtype=torch.bool))
    if len(prompt.item_embeds) != len(prompt.mm_features):
        raise ValueError(f"{len(prompt.item_embeds)} item embeddings for {len(prompt.mm_features)} multimodal items")
    # The merge fills placeholder rows in prompt order, so order items by offset.
    ordered = sorted(zip(prompt.mm_features, prompt.item_embeds), key=lambda fe: fe[0].mm_position.offset)
    is_mm = torch.zeros(ids.shape[0], dtype=torch.bool)
    for feature, emb in ordered:
        pos, name = feature.mm_position, f"{feature.modality} item {feature.identifier}"
        if pos.offset + pos.length > ids.shape[0]:
            raise ValueError(f"{name}: placeholder {pos} lies beyond the {ids.shape[0]}-token prompt")
        mask = torch.ones(pos.length, dtype=torch.bool) if pos.is_embed is None else pos.is_embed.bool().cpu()
        if emb.shape[0] != int(mask.sum()):
            raise ValueError(f"{name}: {emb.shape[0]} embeddings for {int(mask.sum())} placeholder rows")
        span = is_mm[pos.offset : pos.offset + pos.length]  # a view: `|=` writes into is_mm
        if bool((span & mask).any()):
            raise ValueError(f"{name}: placeholder {pos} overlaps another item")
        span |= mask
    item_rows = [e.to(device) for _, e in ordered]
    if rows is not None:
        # The kept rows only: their ids, and of the items' rows (in prompt order, as
        # the merge fills them) the ones at kept positions.
        kept = torch.zeros(ids.shape[0], dtype=torch.bool)
        kept[rows.cpu()] = True
        item_rows = [torch.cat(item_rows)[kept[is_mm].to(device)]]
        ids, is_mm = ids[rows.to(device)], is_mm[rows.cpu()]
    return MergeInputs(ids, item_rows, is_mm)
