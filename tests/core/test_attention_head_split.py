"""s_attn from attention heads split over ranks (tensor parallelism) combines to the whole."""

from __future__ import annotations

import pytest
import torch

from hippo_vllm.core import AttentionScoreAccumulator

NUM_LAYERS, L_TXT, HEAD_DIM, N_V = 3, 5, 8, 24


def random_layers(num_q_heads: int, num_kv_heads: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    queries = [2.0 * torch.randn(L_TXT, num_q_heads, HEAD_DIM, generator=generator) for _ in range(NUM_LAYERS)]
    keys = [2.0 * torch.randn(N_V, num_kv_heads, HEAD_DIM, generator=generator) for _ in range(NUM_LAYERS)]
    return queries, keys


def shard(queries, keys, rank: int, world: int):
    """What rank ``rank`` of ``world`` holds, as vLLM shards attention: contiguous query
    heads, and its KV heads (replicated when there are fewer KV heads than ranks)."""
    num_q, num_kv = queries[0].shape[1], keys[0].shape[1]
    q_per_rank = num_q // world
    kv_per_rank = max(1, num_kv // world)
    kv_start = rank * kv_per_rank if num_kv >= world else rank * num_kv // world
    q_slice = slice(rank * q_per_rank, (rank + 1) * q_per_rank)
    kv_slice = slice(kv_start, kv_start + kv_per_rank)
    return [q[:, q_slice] for q in queries], [k[:, kv_slice] for k in keys]


def accumulate(queries, keys, layers) -> AttentionScoreAccumulator:
    acc = AttentionScoreAccumulator(N_V)
    for layer, q, k in zip(layers, queries, keys, strict=True):
        acc.add_layer(q, k, layer=layer)
    return acc


@pytest.mark.parametrize(
    ("num_q_heads", "num_kv_heads", "world"),
    [(6, 2, 2), (8, 4, 4), (6, 1, 2), (4, 2, 4)],
    ids=["gqa-tp2", "gqa-tp4", "kv-replicated-tp2", "kv-replicated-tp4"],
)
def test_summed_rank_totals_equal_the_whole(num_q_heads, num_kv_heads, world):
    queries, keys = random_layers(num_q_heads, num_kv_heads)
    layers = [4, 0, 9]  # any keys, in any order, as long as every rank uses the same
    whole = accumulate(queries, keys, layers).scores()

    ranks = [accumulate(*shard(queries, keys, r, world), layers) for r in range(world)]
    totals = [acc.layer_totals(layers) for acc in ranks]
    combined = AttentionScoreAccumulator(N_V)
    combined.set_layer_totals(layers, sum(t[0] for t in totals), sum(t[1] for t in totals))

    torch.testing.assert_close(combined.scores(), whole, rtol=1e-6, atol=1e-7)
    # One rank's heads alone are not the whole: the combination is what makes it right.
    assert not torch.allclose(ranks[0].scores(), whole, rtol=1e-3, atol=1e-4)


def test_layer_totals_of_a_missing_layer_are_zero_and_it_stays_missing():
    queries, keys = random_layers(4, 2)
    acc = accumulate(queries[:2], keys[:2], [0, 1])
    sums, counts = acc.layer_totals([0, 1, 2])
    assert sums.shape == (3, N_V) and sums.dtype == torch.float64
    assert counts.tolist() == [L_TXT * 4, L_TXT * 4, 0]
    assert sums[2].abs().sum() == 0

    reloaded = AttentionScoreAccumulator(N_V)
    reloaded.set_layer_totals([0, 1, 2], sums, counts)
    assert reloaded.num_layers == 2
    torch.testing.assert_close(reloaded.scores(), acc.scores())


def test_set_layer_totals_rejects_bad_layouts():
    acc = AttentionScoreAccumulator(N_V)
    with pytest.raises(ValueError, match=r"prob_sums must be \[2, 24\]"):
        acc.set_layer_totals([0, 1], torch.zeros(2, N_V + 1, dtype=torch.float64), torch.ones(2))
    with pytest.raises(ValueError, match=r"pair_counts must be \[2\]"):
        acc.set_layer_totals([0, 1], torch.zeros(2, N_V, dtype=torch.float64), torch.ones(3))
    with pytest.raises(ValueError, match="whole numbers >= 0"):
        acc.set_layer_totals([0, 1], torch.zeros(2, N_V, dtype=torch.float64), torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="whole numbers >= 0"):
        acc.set_layer_totals([0, 1], torch.zeros(2, N_V, dtype=torch.float64), torch.tensor([1.5, 1.0]))
