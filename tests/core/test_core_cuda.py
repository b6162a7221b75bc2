"""The scoring core on a CUDA device, in the dtypes a GPU server feeds it.

On a GPU the draft's video embeddings and the target's post-RoPE q/k arrive as
bfloat16 CUDA tensors. These tests check that every pruning method runs on them
without a host round trip of the inputs, and that the result matches the float32
CPU reference: exactly for float32 inputs (same algorithm, same tie-break), and
up to bf16 rounding for bfloat16 inputs. They need a CUDA device; ``make
gpu-check`` runs them there, and on a CPU-only machine they are skipped.
"""

from __future__ import annotations

import pytest
import torch

from hippo_vllm.core import (
    PRUNING_METHODS,
    AttentionScoreAccumulator,
    VideoGrid,
    select_video_tokens,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GRID = VideoGrid(8, 16, 16)  # 2,048 video tokens
WIDTH = 3584  # Qwen2.5-VL-7B embedding width
KEEP = 0.1


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    # A moving bright square over a noisy static background, so the scores have
    # structure (not only noise) and the selection is not decided by tiny margins.
    base = torch.randn(GRID.h, GRID.w, WIDTH, generator=generator)
    frames = base.expand(GRID.t, -1, -1, -1).clone()
    frames += 0.05 * torch.randn(frames.shape, generator=generator)
    for t in range(GRID.t):
        frames[t, 4:8, 2 + t : 6 + t] += 3.0
    attn = torch.rand(GRID.num_tokens, generator=generator)
    return {"embeds": frames.reshape(GRID.num_tokens, WIDTH), "attn": attn / attn.sum()}


def _select(pruning: str, embeds: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    return select_video_tokens(pruning, GRID, KEEP, video_embeds=embeds, attn=attn)


@pytest.mark.parametrize("pruning", PRUNING_METHODS)
def test_float32_on_cuda_equals_cpu(inputs, pruning):
    cpu = _select(pruning, inputs["embeds"], inputs["attn"])
    gpu = _select(pruning, inputs["embeds"].cuda(), inputs["attn"].cuda())
    assert torch.equal(gpu.cpu(), cpu)


@pytest.mark.parametrize("pruning", PRUNING_METHODS)
def test_bfloat16_on_cuda_keeps_nearly_the_same_tokens(inputs, pruning):
    cpu = set(_select(pruning, inputs["embeds"], inputs["attn"]).tolist())
    gpu = _select(
        pruning,
        inputs["embeds"].to("cuda", torch.bfloat16),
        inputs["attn"].to("cuda", torch.bfloat16),
    )
    assert len(gpu) == len(cpu)
    overlap = len(cpu & set(gpu.cpu().tolist())) / len(cpu)
    assert overlap >= 0.9, f"{pruning}: bf16 CUDA keeps {overlap:.0%} of the float32 CPU selection"


def test_attention_accumulator_on_cuda_matches_cpu():
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(48, 28, 128, generator=generator)  # text queries, 28 query heads
    k = torch.randn(GRID.num_tokens, 4, 128, generator=generator)  # 4 KV heads (GQA)
    reference = AttentionScoreAccumulator(GRID.num_tokens)
    reference.add_layer(q, k, layer=0)
    on_gpu = AttentionScoreAccumulator(GRID.num_tokens)
    # bf16 inputs in two query chunks, as chunked prefill delivers them
    on_gpu.add_layer(q[:20].to("cuda", torch.bfloat16), k.to("cuda", torch.bfloat16), layer=0)
    on_gpu.add_layer(q[20:].to("cuda", torch.bfloat16), k.to("cuda", torch.bfloat16), layer=0)
    scores = on_gpu.scores()
    assert scores.device.type == "cuda"
    torch.testing.assert_close(scores.cpu(), reference.scores(), rtol=0.05, atol=1e-6)
