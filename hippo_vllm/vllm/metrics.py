"""Hippo's own figures, counted in the worker: how much video the draft saw."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class HippoStats:
    """Cumulative counters since the engine started."""

    draft_views: int = 0  # requests whose draft view was built
    video_tokens_total: int = 0  # video tokens in those prompts (the target sees all)
    video_tokens_seen: int = 0  # of which the draft saw
    pruning_seconds: float = 0.0  # draft vision encoding excluded; scoring + selection
    views_without_target_attention: int = 0  # s_attn unavailable (e.g. prefix-cache hit)
    draft_tokens: int = 0  # tokens proposed

    def record_view(self, view) -> None:
        self.draft_views += 1
        self.video_tokens_total += view.video_tokens
        self.video_tokens_seen += view.video_tokens_seen
        self.pruning_seconds += view.pruning_seconds
        if view.video_tokens and not view.attention_used:
            self.views_without_target_attention += 1

    def record_drafts(self, num_tokens: int) -> None:
        self.draft_tokens += num_tokens

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)
