"""Each live request's draft view and its input rows, and recent ones reused for prefix-cache hits.

A request's view (which prompt rows the draft keeps) is built once, when its
draft is first prefilled, and kept until vLLM finishes the request, so a
preempted request that resumes is drafted from the same rows. The draft's input
rows of the view (its kept rows' embeddings, the draft's vision encoder's output
at the video rows) are kept with it, so a resumed request is prefilled again
without encoding its video again.

A prompt served from vLLM's prefix cache is not recomputed, so the target's
attention to its video cannot be captured again; an identical prompt seen
recently reuses its view (same prompt, same selection) and, when they fit in
``RECENT_ROWS_BYTES`` of host memory, its input rows. (A new prompt about a recent
video builds a view of its own from the draft encoder's recent output: ``recent_encodes``.)

This lives on the draft's side (``draft_worker``): the target's side learns of
each view through a ``ViewReport``.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from hippo_vllm.config import HippoConfig
from hippo_vllm.core import VideoGrid
from hippo_vllm.vllm.protocol import DraftPrompt
from hippo_vllm.vllm.draft.view import DraftView, ViewInputs, build_draft_views

RECENT_VIEWS = 256  # draft views remembered by prompt; each is one index tensor
# Input rows of finished requests remembered with their views, in host memory (a
# view's rows are its kept rows only: ~10% of a video's, times the draft's width).
RECENT_ROWS_BYTES = 256 << 20


class _LruCache:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: OrderedDict[Any, Any] = OrderedDict()

    def get(self, key: Any) -> Any:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: Any, value: Any) -> list[Any]:
        """Store ``value``; returns the values evicted to make room."""
        self._items[key] = value
        self._items.move_to_end(key)
        evicted = []
        while len(self._items) > self.capacity:
            evicted.append(self._items.popitem(last=False)[1])
        return evicted


def _prompt_key(prompt: DraftPrompt) -> tuple:
    return tuple(prompt.prompt_token_ids), tuple(f.identifier for f in prompt.mm_features)


def _attention_missing(attention: list | None) -> bool:
    return attention is not None and any(a is None for a in attention)


@dataclasses.dataclass
class _Recent:
    view: DraftView
    rows: torch.Tensor | None = None  # the view's input rows, on the host


class RequestViews:
    """Draft views and their input rows by request id."""

    def __init__(self, hippo: HippoConfig, video_grid: Callable[[Any], VideoGrid], video_newlines: int = 0,
                 recent_rows_bytes: int = RECENT_ROWS_BYTES):
        self.hippo = hippo
        self.video_grid = video_grid
        self.video_newlines = video_newlines  # the target family's ModelFamily.video_newlines
        self.recent_rows_bytes = recent_rows_bytes
        self._views: dict[str, DraftView] = {}
        self._keys: dict[str, tuple] = {}  # request -> its prompt's key
        self._rows: dict[str, torch.Tensor] = {}  # request -> its view's input rows (draft device)
        self._recent = _LruCache(RECENT_VIEWS)  # prompt key -> _Recent
        self._recent_bytes = 0

    def __contains__(self, req_id: str) -> bool:
        return req_id in self._views

    def __len__(self) -> int:
        return len(self._views)

    def get(self, req_id: str) -> DraftView | None:
        return self._views.get(req_id)

    def rows(self, req_id: str, device: torch.device) -> torch.Tensor | None:
        """The view's input rows, kept or recent (None: to be embedded)."""
        rows = self._rows.get(req_id)
        if rows is None and req_id in self._keys:
            recent = self._recent.get(self._keys[req_id])
            if recent is not None and recent.view is self._views.get(req_id) and recent.rows is not None:
                rows = self._rows[req_id] = recent.rows.to(device)
        return rows

    def keep_rows(self, req_id: str, rows: torch.Tensor) -> None:
        """Keep the request's input rows until it finishes (a preempted request reuses them)."""
        if req_id in self._views:
            self._rows[req_id] = rows

    def drop(self, req_id: str) -> None:
        """The request finished: its view and rows go, the rows to the recent ones if they fit."""
        view, key, rows = self._views.pop(req_id, None), self._keys.pop(req_id, None), self._rows.pop(req_id, None)
        if view is None or key is None or rows is None:
            return
        recent = self._recent.get(key)
        size = rows.numel() * rows.element_size()
        if recent is None or recent.view is not view or recent.rows is not None:
            return
        if self._recent_bytes + size > self.recent_rows_bytes:
            return
        recent.rows = rows.to("cpu", copy=True)
        self._recent_bytes += size

    def reusable(self, prompt: DraftPrompt, attention: list | None) -> DraftView | None:
        """A recent view of the same prompt, when the target's attention could not be captured."""
        if not _attention_missing(attention):
            return None
        recent = self._recent.get(_prompt_key(prompt))
        return recent.view if recent is not None else None

    def build(
        self,
        req_id: str,
        prompt: DraftPrompt,
        item_embeds: list[torch.Tensor] | None,
        attention: list[torch.Tensor | None] | None,
    ) -> DraftView:
        """The request's view from the draft's item embeddings and the target's s_attn per video.

        ``item_embeds`` may be None only when :meth:`reusable` has a view for the prompt.
        """
        view = self.reusable(prompt, attention)
        if view is None:
            if item_embeds is None:
                raise ValueError(f"request {req_id!r}: a view to build needs the draft's item embeddings")
            return self.build_new([(req_id, prompt, item_embeds, attention)])[0]
        self._keep(req_id, _prompt_key(prompt), view)
        return view

    def build_new(
        self, requests: list[tuple[str, DraftPrompt, list[torch.Tensor], list[torch.Tensor | None] | None]],
    ) -> list[DraftView]:
        """New views of several requests (request id, prompt, item embeddings, s_attn), their
        videos scored together (``build_draft_views``); all or none is kept."""
        views = build_draft_views(
            self.hippo,
            [ViewInputs(len(prompt.prompt_token_ids), prompt.mm_features, item_embeds, attention)
             for _, prompt, item_embeds, attention in requests],
            self.video_grid, self.video_newlines,
        )
        for (req_id, prompt, _, _), view in zip(requests, views):
            key = _prompt_key(prompt)
            self._remember(key, view)
            self._keep(req_id, key, view)
        return views

    def _keep(self, req_id: str, key: tuple, view: DraftView) -> None:
        self._views[req_id] = view
        self._keys[req_id] = key

    def _remember(self, key: tuple, view: DraftView) -> None:
        old = self._recent.get(key)
        if old is not None and old.rows is not None:
            self._recent_bytes -= old.rows.numel() * old.rows.element_size()
        evicted = self._recent.put(key, _Recent(view))
        for entry in evicted:
            if entry.rows is not None:
                self._recent_bytes -= entry.rows.numel() * entry.rows.element_size()
