"""Hippo's own figures, counted in the worker: video seen by the draft, VPSD rounds.

``HippoStats`` holds the cumulative counters; ``EXPORTED_STATS`` is the one table
of what leaves the worker. Each row is a ``HippoStats`` field and its description;
the field name makes the Prometheus name (``draft_views`` ->
``vllm:hippo_draft_views_total``), so a new figure is a new field plus a new row,
and the snapshot file, the Prometheus collector and ``LLM.get_metrics()`` pick it
up without further code.
"""

from __future__ import annotations

import dataclasses

METRIC_PREFIX = "vllm:hippo_"  # vLLM's namespace, so dashboards and get_metrics() see them

EXPORTED_STATS: dict[str, str] = {
    "draft_views": "Requests whose draft view (pruned prompt) was built.",
    "video_tokens_total": "Video tokens in the prompts of those requests (the target sees all).",
    "video_tokens_seen": "Of those video tokens, the ones the draft saw.",
    "pruning_seconds": "Time spent scoring and selecting video tokens (draft vision encoding excluded).",
    "views_without_target_attention": (
        "Draft views of videos built without the target's attention signal "
        "(e.g. after a prefix-cache hit)."
    ),
    "draft_tokens": "Tokens the draft proposed.",
    "draft_encodes": (
        "Multimodal items the draft's vision encoder ran on (a preempted request, a prompt seen "
        "again through vLLM's prefix cache and a new question about a recent video reuse the "
        "draft's earlier work instead)."
    ),
    "first_draft_steps": (
        "Target steps from a request's first token to its first step that verified drafts (1: the "
        "very next step); divide by first_drafts for the mean."
    ),
    "first_drafts": "Requests that had drafts verified (the count for first_draft_steps).",
    "draft_kv_full": (
        "Times a request got no draft for a step because the draft's KV cache was full "
        "(drafting pauses for it; outputs are unaffected; raise draft_kv_tokens if it grows)."
    ),
    "drafting_failures": (
        "Requests hit by an error in drafting (they go on without speculation) or in the "
        "attention capture (their views are built without s_attn); an error not attributable "
        "to one request counts every request of its step. Outputs are unaffected; each distinct cause "
        "is logged once with its traceback."
    ),
    # Parallel drafting (VPSD) rounds, counted by hippo_vllm.core.vpsd.RoundStats.
    "target_forwards": "Target steps of requests drafted in parallel mode (one per request and step).",
    "committed_tokens": "Tokens those steps committed (accepted draft tokens plus the target's own).",
    "round_drafted_tokens": (
        "Draft tokens verified in parallel mode, incl. each chunk's first token, which is "
        "checked against the target's own token outside vLLM's rejection sampler."
    ),
    "round_accepted_tokens": "Of those, the accepted ones.",
    "optimistic_rounds": "Steps a request spent in optimistic mode (verifying γ−1 spec tokens).",
    "conservative_rounds": "Steps a request spent in conservative mode (no spec tokens).",
    "round_restarts": (
        "Rounds restarted with drafts after a rejection (a draft of its own: the target waited for a short "
        "chunk drafted from the corrected token instead of running a step without spec tokens)."
    ),
    "mat_sum": "Sum of PEARL accepted-run lengths (+1 for the correction): MAT = mat_sum / mat_runs.",
    "mat_runs": "Number of PEARL accepted runs recorded.",
    # Where the time goes (wall clock in the worker; drafting runs in sequence with the target).
    "target_step_seconds": "Time in the target's steps (forward and sampling, without drafting).",
    "draft_seconds": "Time drafting chunks, including waiting for them.",
    "draft_prefill_seconds": "Time building draft views and prefilling the draft (vision encoder included).",
    "target_attention_seconds": (
        "Time computing s_attn inside the target's prefill (text queries against the video's "
        "keys in the KV cache, every configured layer; on CUDA measured by events)."
    ),
    # A draft worker of its own ("draft_worker": {"placement": "process" | "ray"}).
    "draft_round_trip_seconds": (
        "Draft worker: time from sending a step's drafting work to reading its answer "
        "(divide by draft_round_trips for the mean)."
    ),
    "draft_round_trips": "Draft worker: answers read in time (late ones are dropped uncounted here).",
    "draft_wait_seconds": "Draft worker: time the target waited for the draft's answers.",
    "draft_dropped_steps": (
        "Draft worker: steps that went on without drafts because the answer was not back by "
        "the deadline (timeout_ms; its chunks are dropped, its other news is taken in when it "
        "comes) or the worker was down."
    ),
    "draft_worker_restarts": "Draft worker: restarts after it died, stalled or fell behind.",
    "draft_worker_down_seconds": (
        "Draft worker: time drafting was off because the worker was lost, restarting, or left "
        "off after a crash loop (counted while the engine runs steps)."
    ),
}


def metric_name(field: str) -> str:
    """The Prometheus counter name of an exported field, with the ``_total`` suffix."""
    name = METRIC_PREFIX + field
    return name if name.endswith("_total") else name + "_total"


@dataclasses.dataclass
class HippoStats:
    """Cumulative counters since the engine started."""

    draft_views: int = 0  # requests whose draft view was built
    video_tokens_total: int = 0  # video tokens in those prompts (the target sees all)
    video_tokens_seen: int = 0  # of which the draft saw
    pruning_seconds: float = 0.0  # draft vision encoding excluded; scoring + selection
    views_without_target_attention: int = 0  # s_attn unavailable (e.g. prefix-cache hit)
    draft_tokens: int = 0  # tokens proposed
    draft_encodes: int = 0  # items the draft's vision encoder ran on
    first_draft_steps: int = 0  # steps from the first token to the first drafted step, summed
    first_drafts: int = 0
    draft_kv_full: int = 0  # request steps without a draft: draft KV cache full
    drafting_failures: int = 0  # requests hit by an error in drafting or the capture
    target_forwards: int = 0
    committed_tokens: int = 0
    round_drafted_tokens: int = 0
    round_accepted_tokens: int = 0
    optimistic_rounds: int = 0
    conservative_rounds: int = 0
    round_restarts: int = 0
    mat_sum: int = 0
    mat_runs: int = 0
    target_step_seconds: float = 0.0
    draft_seconds: float = 0.0
    draft_prefill_seconds: float = 0.0
    target_attention_seconds: float = 0.0
    draft_round_trip_seconds: float = 0.0
    draft_round_trips: int = 0
    draft_wait_seconds: float = 0.0
    draft_dropped_steps: int = 0
    draft_worker_restarts: int = 0
    draft_worker_down_seconds: float = 0.0

    def record_view(self, view) -> None:
        self.draft_views += 1
        self.video_tokens_total += view.video_tokens
        self.video_tokens_seen += view.video_tokens_seen
        self.pruning_seconds += view.pruning_seconds
        if view.video_tokens and not view.attention_used:
            self.views_without_target_attention += 1

    def record_drafts(self, num_tokens: int) -> None:
        self.draft_tokens += num_tokens

    def record_rounds(self, rounds) -> None:
        """Add a ``hippo_vllm.core.vpsd.RoundStats`` (one request's step)."""
        self.target_forwards += rounds.target_forwards
        self.committed_tokens += rounds.committed_tokens
        self.round_drafted_tokens += rounds.drafted_tokens
        self.round_accepted_tokens += rounds.accepted_tokens
        self.optimistic_rounds += rounds.optimistic_rounds
        self.conservative_rounds += rounds.conservative_rounds
        self.round_restarts += rounds.restarts
        self.mat_sum += rounds.mat_sum
        self.mat_runs += rounds.mat_count

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    def exported(self) -> dict[str, float]:
        """The ``EXPORTED_STATS`` fields and their current values."""
        return {field: getattr(self, field) for field in EXPORTED_STATS}
