"""Each live request's draft view, and recent views reused for prefix-cache hits.

A request's view (which prompt rows the draft keeps) is built once, when its
draft is first prefilled, and kept until vLLM finishes the request, so a
preempted request that resumes is drafted from the same rows. A prompt served
from vLLM's prefix cache is not recomputed, so the target's attention to its
video cannot be captured again; an identical prompt seen recently reuses its
view (same prompt, same selection).

This lives on the draft's side (``draft_worker``): the target's side learns of
each view through a ``ViewReport``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from hippo_vllm.config import HippoConfig
from hippo_vllm.core import VideoGrid
from hippo_vllm.vllm.protocol import DraftPrompt
from hippo_vllm.vllm.draft.view import DraftView, build_draft_view

RECENT_VIEWS = 256  # draft views remembered by prompt; each is one index tensor


class _LruCache:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: OrderedDict[Any, Any] = OrderedDict()

    def get(self, key: Any) -> Any:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: Any, value: Any) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)


def _prompt_key(prompt: DraftPrompt) -> tuple:
    return tuple(prompt.prompt_token_ids), tuple(f.identifier for f in prompt.mm_features)


def _attention_missing(attention: list | None) -> bool:
    return attention is not None and any(a is None for a in attention)


class RequestViews:
    """Draft views by request id."""

    def __init__(self, hippo: HippoConfig, video_grid: Callable[[Any], VideoGrid], video_newlines: int = 0):
        self.hippo = hippo
        self.video_grid = video_grid
        self.video_newlines = video_newlines  # the target family's ModelFamily.video_newlines
        self._views: dict[str, DraftView] = {}
        self._recent = _LruCache(RECENT_VIEWS)

    def __contains__(self, req_id: str) -> bool:
        return req_id in self._views

    def __len__(self) -> int:
        return len(self._views)

    def get(self, req_id: str) -> DraftView | None:
        return self._views.get(req_id)

    def drop(self, req_id: str) -> None:
        self._views.pop(req_id, None)

    def build(
        self,
        req_id: str,
        prompt: DraftPrompt,
        item_embeds: list[torch.Tensor],
        attention: list[torch.Tensor | None] | None,
    ) -> DraftView:
        """The request's view from the draft's item embeddings and the target's s_attn per video."""
        key = _prompt_key(prompt)
        view = self._recent.get(key) if _attention_missing(attention) else None
        if view is None:
            view = build_draft_view(
                self.hippo, len(prompt.prompt_token_ids), prompt.mm_features, item_embeds, attention,
                self.video_grid, self.video_newlines,
            )
        self._recent.put(key, view)
        self._views[req_id] = view
        return view
