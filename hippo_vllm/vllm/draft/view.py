"""The draft's view of a prompt: text unchanged, each video pruned to keep_ratio.

The draft runs its own vision encoder on the request's video inputs (the target's
embeddings have another width), scores each video's tokens with the core's
selection (holistic by default, a baseline for ablation), and keeps the chosen
rows in their original order. Every kept row keeps its original position (M-RoPE
(t, h, w), or 1-D), so text after the video and every generated token sit at the
same positions as in the target; only the draft's KV index (its compact length)
differs. Text inside a video's placeholder (Qwen3-VL's timestamps and vision
start/end tokens) is kept, and so are the newline rows after a video's frames
(LLaVA-OneVision's ``image_newline``): they are not frame tokens, so they are
neither scored nor counted as video tokens. Images and text-only prompts are
drafted in full.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch

from hippo_vllm.config import HippoConfig
from hippo_vllm.core import VideoGrid, select_video_tokens_batch


@dataclasses.dataclass(frozen=True)
class DraftView:
    """What the draft sees of one request's prompt."""

    keep_rows: torch.Tensor  # [Pc] int64 prompt rows kept, ascending
    prompt_len: int  # P, the full prompt length (target side)
    video_tokens: int  # video tokens in the prompt
    video_tokens_seen: int  # of which the draft sees
    pruning_seconds: float  # scoring + selection (the draft's vision encoder excluded)
    attention_used: bool  # s_attn from the target was available for every video

    @property
    def compact_len(self) -> int:
        return int(self.keep_rows.numel())


def video_embed_rows(pos: Any) -> torch.Tensor:
    """Rows of a video's placeholder (relative to its offset) that hold video embeddings.

    A Qwen3-VL placeholder also holds text: ``<t seconds><|vision_start|>`` before and
    ``<|vision_end|>`` after each temporal patch's pads, with ``is_embed`` marking the
    pads. Only those rows are scored and pruned; the text rows are always kept.
    """
    if pos.is_embed is None:
        return torch.arange(pos.length)
    return torch.nonzero(pos.is_embed.cpu()).flatten()


@dataclasses.dataclass(frozen=True)
class ViewInputs:
    """What one request's view is built from (see :func:`build_draft_views`)."""

    prompt_len: int
    mm_features: list[Any]
    item_embeds: list[torch.Tensor]
    attention: list[torch.Tensor | None] | None


@dataclasses.dataclass
class _VideoToScore:
    """One video of a view: its prompt rows, and how its kept tokens are chosen."""

    view: int  # index of its request in the batch
    rows: torch.Tensor  # prompt rows of its frame tokens
    grid: VideoGrid
    embeds: torch.Tensor
    attn: torch.Tensor | None
    pruning: str
    weights: dict[str, float]
    kept: torch.Tensor | None = None

    def batch_key(self) -> tuple:
        """Videos with equal keys are scored in one call."""
        return (self.pruning, self.grid, tuple(self.weights.items()), self.attn is None,
                self.embeds.dtype, self.embeds.shape[1])


def build_draft_view(
    hippo: HippoConfig,
    prompt_len: int,
    mm_features: list[Any],
    item_embeds: list[torch.Tensor],
    attention: list[torch.Tensor | None] | None,
    video_grid: Callable[[Any], VideoGrid],
    video_newlines: int = 0,
) -> DraftView:
    """Choose the prompt rows the draft keeps.

    ``item_embeds`` are the draft's encoder outputs, one per mm item in
    ``mm_features`` order (only the video rows' embeddings, ``[n, hidden]``);
    ``attention`` holds s_attn per *video* placeholder (None entries where the
    target's attention could not be captured); ``video_grid`` reads a video
    feature's token grid (the target family's ``ModelFamily.video_grid``);
    ``video_newlines``: rows after each video's frame tokens (and embeddings) that
    hold a newline embedding (``ModelFamily.video_newlines``): always kept.
    """
    inputs = ViewInputs(prompt_len, mm_features, item_embeds, attention)
    return build_draft_views(hippo, [inputs], video_grid, video_newlines)[0]


def build_draft_views(
    hippo: HippoConfig,
    requests: list[ViewInputs],
    video_grid: Callable[[Any], VideoGrid],
    video_newlines: int = 0,
) -> list[DraftView]:
    """:func:`build_draft_view` of several requests; their videos of one grid (and settings)
    are scored in one call, which for small videos costs about what one costs. Each
    view's ``pruning_seconds`` is its share of the whole."""
    start = time.perf_counter()
    videos: list[_VideoToScore] = []
    attention_used = [True] * len(requests)
    for index, request in enumerate(requests):
        attention_used[index] = _plan_videos(hippo, index, request, video_grid, video_newlines, videos)
    groups: dict[tuple, list[_VideoToScore]] = {}
    for video in videos:
        groups.setdefault(video.batch_key(), []).append(video)
    for group in groups.values():
        for video, kept in zip(group, _kept_video_tokens(hippo, group)):
            video.kept = kept
    share = (time.perf_counter() - start) / max(len(requests), 1)
    views = []
    for index, request in enumerate(requests):
        keep = torch.ones(request.prompt_len, dtype=torch.bool)
        total = seen = 0
        for video in (v for v in videos if v.view == index):
            keep[video.rows] = False
            keep[video.rows[video.kept]] = True
            total += int(video.rows.numel())
            seen += int(video.kept.numel())
        views.append(DraftView(
            keep_rows=torch.nonzero(keep).flatten(),
            prompt_len=request.prompt_len,
            video_tokens=total,
            video_tokens_seen=seen,
            pruning_seconds=share,
            attention_used=attention_used[index],
        ))
    return views


def _plan_videos(hippo: HippoConfig, index: int, request: ViewInputs, video_grid: Callable[[Any], VideoGrid],
                 video_newlines: int, videos: list[_VideoToScore]) -> bool:
    """Append the request's videos to ``videos``; whether s_attn was there for every one."""
    video_index = 0
    attention_used = True
    for feature, embeds in zip(request.mm_features, request.item_embeds):
        if feature.modality != "video":
            continue
        attention = request.attention
        attn = attention[video_index] if attention else None
        video_index += 1
        grid = video_grid(feature)
        pos = feature.mm_position
        local = video_embed_rows(pos)
        if video_newlines:
            # The newline rows stay kept (``keep`` starts all True); only frame tokens compete.
            local, embeds = local[:-video_newlines], embeds[:-video_newlines]
        if grid.num_tokens != local.numel() or embeds.shape[0] != local.numel():
            raise ValueError(
                f"video at prompt offset {pos.offset}: {local.numel()} video rows in its {pos.length}-row "
                f"placeholder ({video_newlines} newline rows after them), grid {grid} and "
                f"{embeds.shape[0]} draft frame embeddings disagree"
            )
        if attn is not None and attn.shape[-1] == pos.length != local.numel():
            attn = attn[..., local]  # s_attn covers the whole placeholder; score the video rows
        pruning = hippo.pruning
        if attn is None and hippo.uses_target_attention:
            attention_used = False
            # Without the target's attention the attention-only baselines have
            # nothing to rank by; holistic falls back to its visual signals.
            pruning = "holistic" if pruning == "holistic" else "uniform"
        weights = dict(hippo.score_weights)
        if attn is None:
            weights["attn"] = 0.0
        if pruning == "holistic" and not any(weights.values()):
            pruning = "uniform"  # attention was the only enabled signal
        videos.append(_VideoToScore(index, pos.offset + local, grid, embeds, attn, pruning, weights))
    return attention_used


def _kept_video_tokens(hippo: HippoConfig, videos: list[_VideoToScore]) -> list[torch.Tensor]:
    """Indices of each video's kept tokens (videos of one batch key); none at ``keep_ratio`` 0
    (the core keeps at least one)."""
    if hippo.keep_ratio == 0.0:
        return [torch.empty(0, dtype=torch.int64) for _ in videos]
    first = videos[0]
    kept = select_video_tokens_batch(
        first.pruning,
        first.grid,
        hippo.keep_ratio,
        video_embeds=[v.embeds for v in videos],
        attn=None if first.attn is None else [v.attn for v in videos],
        weights=first.weights,
        crop=hippo.crop_size,
        selection=hippo.selection,
    )
    return [k.cpu() for k in kept]
