"""Pure-torch scoring core of HIPPO: which video tokens the draft model keeps.

No vLLM or transformers import happens here (or anywhere below), so the core
is testable in a second and reusable by another engine. What it offers (the
scoring API page, docs/scoring_api.md, says what each function computes):

- :class:`VideoGrid` — token geometry of one video (t-major, then h, then w);
- :func:`attention_scores` / :class:`AttentionScoreAccumulator` — s_attn;
- :func:`temporal_scores`, :func:`spatial_scores` — s_temp, s_spa;
- :func:`holistic_scores` — per-frame min-max normalisation and weighted fusion;
- :func:`select_tokens` — top-k selection (global or per-frame quota);
- baselines (attention top-k, uniform, temporal/EVS-like, SpecVLM);
- :func:`select_video_tokens` — one dispatcher over all pruning methods
  (``_batch`` variants score several videos of one grid at once);
- :func:`position_bias`, :func:`boundary_attention_mass` — border-bias metrics.
"""

from hippo_vllm.core.attention_signal import AttentionScoreAccumulator, attention_scores
from hippo_vllm.core.baselines import (
    select_attention_topk,
    select_specvlm,
    select_temporal,
    select_uniform,
)
from hippo_vllm.core.holistic import (
    SIGNALS,
    holistic_scores,
    holistic_scores_batch,
    normalize_per_frame,
    parse_weights,
)
from hippo_vllm.core.position_bias import boundary_attention_mass, position_bias
from hippo_vllm.core.pruning import PRUNING_METHODS, select_video_tokens, select_video_tokens_batch
from hippo_vllm.core.selection import SELECTION_MODES, num_kept, select_tokens, select_tokens_batch
from hippo_vllm.core.video_grid import VideoGrid
from hippo_vllm.core.visual_scores import spatial_scores, temporal_scores
from hippo_vllm.core.vpsd import Mode, RoundStats, VpsdRequest, autoregressive, simulate

__all__ = [
    "PRUNING_METHODS",
    "SELECTION_MODES",
    "SIGNALS",
    "AttentionScoreAccumulator",
    "VideoGrid",
    "attention_scores",
    "boundary_attention_mass",
    "holistic_scores",
    "holistic_scores_batch",
    "normalize_per_frame",
    "num_kept",
    "parse_weights",
    "position_bias",
    "select_attention_topk",
    "select_specvlm",
    "select_temporal",
    "select_tokens",
    "select_tokens_batch",
    "select_uniform",
    "select_video_tokens",
    "select_video_tokens_batch",
    "spatial_scores",
    "temporal_scores",
    "Mode",
    "RoundStats",
    "VpsdRequest",
    "autoregressive",
    "simulate",
]
