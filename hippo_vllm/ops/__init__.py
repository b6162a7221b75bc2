"""Fused kernels of hippo_vllm (sources in ``csrc/``), with the torch code of
:mod:`hippo_vllm.core` as their fallback and test oracle. Never imports vLLM.

- :func:`video_key_colsum` — s_attn's per-layer sums straight from a paged KV cache.
"""

from hippo_vllm.ops.video_attention import (
    KeyLayout,
    gather_video_keys,
    kernel_status,
    video_key_colsum,
    video_key_colsum_torch,
)

__all__ = ["KeyLayout", "gather_video_keys", "kernel_status", "video_key_colsum", "video_key_colsum_torch"]
