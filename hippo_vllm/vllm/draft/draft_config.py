"""The draft's own VllmConfig, and what it takes from the target's.

The draft is loaded by vLLM's own model code under a config of its own
(:func:`make_draft_vllm_config`): the draft checkpoint's model config, one rank,
eager (no compile, no CUDA graphs of the target's) with vLLM's custom ops.
:func:`tokenizer_length` tells which of its output rows are tokenizer ids.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from vllm.config import CompilationMode, CUDAGraphMode, VllmConfig
from vllm.config.speculative import SpeculativeConfig
from vllm.config.utils import replace
from vllm.engine.arg_utils import EngineArgs

from hippo_vllm.vllm.model_families import MROPE, family_of, supported_architectures


def tokenizer_length(model_config: Any) -> int:
    """Ids the model's tokenizer knows (its vocabulary with added tokens)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        model_config.tokenizer, trust_remote_code=model_config.trust_remote_code,
        revision=model_config.tokenizer_revision,
    )
    return len(tokenizer)


def make_draft_vllm_config(
    target_vllm_config: VllmConfig, draft_model: str | Path, dtype: torch.dtype | str | None = None
) -> VllmConfig:
    """The draft's own VllmConfig: the target's, with the draft's ModelConfig.

    The draft runs without torch.compile, whatever the target does (compilation
    mode NONE, cudagraph mode NONE, enforce_eager). A compiled draft would compile
    on its first request, in the middle of serving, and would accept only batch
    sizes up to ``max_num_batched_tokens``. In a worker of its own its decode steps
    replay CUDA graphs of its own (``DraftEngine.capture_decode_graphs``).

    Sub-configs the draft may change are copies: a fresh compilation config (the
    draft registers its layers in its ``static_forward_context``), and shallow
    copies of the cache/scheduler configs, because ``VllmConfig``'s post-init and
    the draft's KV layout choice write into them. The parallel config is the one
    vLLM makes for a draft of tensor-parallel size 1 (the draft runs whole on one
    rank, see tensor_parallel). ``quant_config`` is re-derived from the draft
    checkpoint instead of inheriting the target's.
    """
    target_mc = target_vllm_config.model_config
    mm = target_mc.multimodal_config
    mm_args = {}
    if mm is not None:
        mm_args = {
            # Counts only: the draft never profiles, it just must accept the same items.
            "limit_mm_per_prompt": {m: mm.get_limit_per_prompt(m) for m in mm.limit_per_prompt},
            # The features come from the *target's* processor; whether its pixels are
            # still uint8 (normalised by each ViT itself) must agree with the draft.
            "mm_device_do_normalize": mm.mm_device_do_normalize,
        }
    draft_mc = EngineArgs(
        model=str(draft_model),
        dtype=dtype if dtype is not None else target_mc.dtype,
        max_model_len=target_mc.max_model_len,
        seed=target_mc.seed,
        trust_remote_code=target_mc.trust_remote_code,
        enforce_eager=True,  # see below: the draft always runs eagerly
        **mm_args,
    ).create_model_config()
    family = family_of(draft_mc.hf_config)
    if family is None or draft_mc.multimodal_config is None:
        raise ValueError(
            f"draft {draft_model} ({draft_mc.architectures}) is of no vision-language model family "
            f"hippo supports; supported architectures: {supported_architectures()}"
        )
    if family.positions == MROPE and not draft_mc.uses_mrope:
        raise ValueError(
            f"draft {draft_model} ({draft_mc.architectures}): vLLM does not run it with M-RoPE "
            f"positions, which the {family.name} family needs"
        )
    return replace(
        target_vllm_config,
        model_config=draft_mc,
        quant_config=None,
        compilation_config=replace(
            target_vllm_config.compilation_config,
            mode=CompilationMode.NONE,
            cudagraph_mode=CUDAGraphMode.NONE,
            # A compiled target runs without vLLM's custom ops (custom_ops ["none"]: Inductor
            # fuses their torch versions); the eager draft would inherit that and run M-RoPE,
            # RMSNorm and SiLU as plain PyTorch. Its own kernels instead.
            custom_ops=["all"],
        ),
        cache_config=copy.copy(target_vllm_config.cache_config),
        scheduler_config=copy.copy(target_vllm_config.scheduler_config),
        parallel_config=SpeculativeConfig.create_draft_parallel_config(
            target_vllm_config.parallel_config, 1, draft_model_config=draft_mc
        ),
    )
