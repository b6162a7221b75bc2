"""s_attn against a naive float64 full-softmax reference, incl. GQA, chunked queries and blocking."""

from __future__ import annotations

import math

import pytest
import torch

from hippo_vllm.core import AttentionScoreAccumulator, attention_scores
from hippo_vllm.core import attention_signal as attention_module

NUM_LAYERS, L_TXT, H_Q, H_KV, HEAD_DIM, N_V = 3, 7, 8, 2, 16, 40


def random_layers(seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    queries = [2.0 * torch.randn(L_TXT, H_Q, HEAD_DIM, generator=generator) for _ in range(NUM_LAYERS)]
    keys = [2.0 * torch.randn(N_V, H_KV, HEAD_DIM, generator=generator) for _ in range(NUM_LAYERS)]
    return queries, keys


def naive_reference(
    queries: list[torch.Tensor], keys: list[torch.Tensor], scale: float | None = None
) -> torch.Tensor:
    """Mean over layers, query heads and text rows of softmax over video keys, in float64 loops."""
    total = torch.zeros(keys[0].shape[0], dtype=torch.float64)
    for q_layer, k_layer in zip(queries, keys, strict=True):
        q64, k64 = q_layer.double(), k_layer.double()
        num_q_heads, num_kv_heads = q64.shape[1], k64.shape[1]
        k_per_query_head = k64.repeat_interleave(num_q_heads // num_kv_heads, dim=1)  # [N_v, H_q, d]
        layer_scale = scale if scale is not None else 1.0 / math.sqrt(q64.shape[-1])
        layer_total = torch.zeros_like(total)
        for head in range(num_q_heads):
            for row in range(q64.shape[0]):
                logits = (k_per_query_head[:, head, :] @ q64[row, head, :]) * layer_scale
                layer_total += torch.softmax(logits, dim=0)
        total += layer_total / (num_q_heads * q64.shape[0])
    return total / len(queries)


def test_matches_naive_reference_for_gqa_layers():
    queries, keys = random_layers()
    expected = naive_reference(queries, keys)
    got = attention_scores(queries, keys)
    assert got.dtype == torch.float32 and got.shape == (N_V,)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-7)
    # Every text query's softmax over the video sums to one, so the mean does too.
    assert math.isclose(float(got.double().sum()), 1.0, rel_tol=1e-5)


def test_stacked_single_and_custom_scale_inputs():
    queries, keys = random_layers(seed=1)
    torch.testing.assert_close(
        attention_scores(torch.stack(queries), torch.stack(keys)), attention_scores(queries, keys)
    )
    torch.testing.assert_close(
        attention_scores(queries[1], keys[1], scale=0.05).double(),
        naive_reference(queries[1:2], keys[1:2], scale=0.05),
        rtol=1e-5,
        atol=1e-7,
    )


def test_query_chunks_of_one_layer_equal_the_whole_layer():
    queries, keys = random_layers(seed=2)
    accumulator = AttentionScoreAccumulator(N_V)
    # Chunked prefill: layer 0's text arrives as rows 0..2 and 3..6, interleaved with layer 1.
    accumulator.add_layer(queries[0][:3], keys[0], layer=0)
    accumulator.add_layer(queries[1], keys[1], layer=1)
    accumulator.add_layer(queries[0][3:], keys[0], layer=0)
    assert accumulator.num_layers == 2
    torch.testing.assert_close(
        accumulator.scores().double(), naive_reference(queries[:2], keys[:2]), rtol=1e-5, atol=1e-7
    )


def test_unequal_chunks_weigh_layers_equally():
    # Layer 0 gets 7 rows, layer 1 only 2: each layer still counts 1/2 in the mean.
    queries, keys = random_layers(seed=3)
    accumulator = AttentionScoreAccumulator(N_V)
    accumulator.add_layer(queries[0], keys[0])
    accumulator.add_layer(queries[1][:2], keys[1])
    expected = (naive_reference(queries[:1], keys[:1]) + naive_reference([queries[1][:2]], keys[1:2])) / 2
    torch.testing.assert_close(accumulator.scores().double(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("head_block", [1, 3, 4, 100])
def test_head_blocks_do_not_change_the_result(head_block):
    queries, keys = random_layers(seed=4)
    accumulator = AttentionScoreAccumulator(N_V)
    accumulator.add_layer(queries[0], keys[0], head_block=head_block)
    torch.testing.assert_close(
        accumulator.scores().double(), naive_reference(queries[:1], keys[:1]), rtol=1e-5, atol=1e-7
    )


def test_tiny_memory_budget_splits_rows(monkeypatch):
    # One row per block: exercises the path where a single head's rows exceed the budget.
    monkeypatch.setattr(attention_module, "DEFAULT_BLOCK_BYTES", 4 * N_V)
    queries, keys = random_layers(seed=5)
    torch.testing.assert_close(
        attention_scores(queries, keys).double(),
        naive_reference(queries, keys),
        rtol=1e-5,
        atol=1e-7,
    )


def test_bfloat16_inputs_are_scored_in_float32():
    queries, keys = random_layers(seed=6)
    q_bf16, k_bf16 = queries[0].bfloat16(), keys[0].bfloat16()
    got = attention_scores(q_bf16, k_bf16)
    assert got.dtype == torch.float32
    torch.testing.assert_close(
        got.double(), naive_reference([q_bf16.float()], [k_bf16.float()]), rtol=1e-5, atol=1e-7
    )


def test_auto_layer_keys_never_merge_into_explicit_ones():
    queries, keys = random_layers(seed=7)
    accumulator = AttentionScoreAccumulator(N_V)
    accumulator.add_layer(queries[0], keys[0], layer=0)
    accumulator.add_layer(queries[1], keys[1])
    assert accumulator.num_layers == 2


@pytest.mark.parametrize(
    ("q_shape", "k_shape", "pattern"),
    [
        (
            (L_TXT, H_Q),
            (N_V, H_KV, HEAD_DIM),
            r"q_text must be a floating tensor \[L_txt, H_q, d\], got shape \[7, 8\]",
        ),
        (
            (L_TXT, H_Q, HEAD_DIM),
            (N_V, HEAD_DIM),
            r"k_video must be a floating tensor \[N_v, H_kv, d\].*\[40, 16\]",
        ),
        (
            (L_TXT, H_Q, HEAD_DIM),
            (N_V, H_KV, 8),
            r"head_dim mismatch: q_text has d=16.*k_video has d=8",
        ),
        (
            (L_TXT, H_Q, HEAD_DIM),
            (N_V, 3, HEAD_DIM),
            r"H_q=8 must be a multiple of k_video heads H_kv=3",
        ),
        (
            (L_TXT, H_Q, HEAD_DIM),
            (N_V + 1, H_KV, HEAD_DIM),
            r"k_video must have N_v=40 video keys, got shape \[41, 2, 16\]",
        ),
        (
            (0, H_Q, HEAD_DIM),
            (N_V, H_KV, HEAD_DIM),
            r"q_text must have at least one query row.*\[0, 8, 16\]",
        ),
    ],
)
def test_add_layer_rejects_bad_shapes(q_shape, k_shape, pattern):
    accumulator = AttentionScoreAccumulator(N_V)
    with pytest.raises(ValueError, match=pattern):
        accumulator.add_layer(torch.zeros(q_shape), torch.zeros(k_shape))
    assert accumulator.num_layers == 0


def test_rejects_bad_scalars_and_layer_counts():
    queries, keys = random_layers()
    accumulator = AttentionScoreAccumulator(N_V)
    with pytest.raises(ValueError, match=r"scale must be > 0, got -1.0"):
        accumulator.add_layer(queries[0], keys[0], scale=-1.0)
    with pytest.raises(ValueError, match=r"scale must be finite, got nan"):
        accumulator.add_layer(queries[0], keys[0], scale=float("nan"))
    with pytest.raises(ValueError, match=r"head_block must be a positive int, got 0"):
        accumulator.add_layer(queries[0], keys[0], head_block=0)
    with pytest.raises(ValueError, match=r"num_video_tokens must be a positive int, got 0"):
        AttentionScoreAccumulator(0)
    with pytest.raises(ValueError, match=r"same number of layers, got 3 and 2"):
        attention_scores(queries, keys[:2])
    with pytest.raises(ValueError, match=r"q_text must contain at least one layer"):
        attention_scores([], keys)
    with pytest.raises(ValueError, match=r"k_video must be 3-D \(one layer\) or 4-D.*\[40\]"):
        attention_scores(queries[0], torch.zeros(N_V))
    with pytest.raises(ValueError, match=r"q_text must be a floating tensor.*torch.int64"):
        accumulator.add_layer(torch.zeros(L_TXT, H_Q, HEAD_DIM, dtype=torch.int64), keys[0])
    with pytest.raises(ValueError, match=r"q_text is on meta but k_video is on cpu"):
        accumulator.add_layer(queries[0].to("meta"), keys[0])
    with pytest.raises(RuntimeError, match=r"before any add_layer"):
        accumulator.scores()
