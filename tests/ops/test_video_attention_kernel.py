"""The compiled s_attn kernel against the torch oracle (hippo_vllm.core's accumulator).

Random inputs, fresh each run (the seed is in every failure message): shapes, GQA
ratios, cache dtypes, fp8 keys with a key scale, each cache layout, non-contiguous
block tables, NaN in every slot the video does not own, and an output that already
holds sums (the kernel adds to it). On the CPU in the default suite;
``HIPPO_KERNEL_TEST_DEVICE=cuda`` (tools/gpu_check.py) runs the same cases on CUDA.
"""

from __future__ import annotations

import os

import pytest
import torch

from hippo_vllm.core import AttentionScoreAccumulator
from hippo_vllm.ops import KeyLayout, kernel_status, video_key_colsum, video_key_colsum_torch
from tests.ops.paged_cache import make_paged_keys

DEVICE = os.environ.get("HIPPO_KERNEL_TEST_DEVICE", "cpu")
CASES = [  # (H_q, H_kv, d, block_size)
    (4, 4, 64, 16),  # no GQA
    (28, 4, 128, 32),  # 7B geometry
    (16, 2, 128, 16),  # 72B, one rank at TP 4
    (6, 1, 80, 32),  # MQA, d not a power of two
]
STORAGE = [  # (cache dtype, fp8 format, key scale)
    (torch.float32, None, 1.0),
    (torch.bfloat16, None, 1.0),
    (torch.float16, None, 1.0),
    (torch.bfloat16, "e4m3", 0.37),
    (torch.float16, "e5m2", 2.5),
]


def fresh_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def oracle(query, keys, scale) -> torch.Tensor:
    accumulator = AttentionScoreAccumulator(keys.shape[0])
    accumulator.add_layer(query, keys, scale=scale, layer=0)
    return accumulator.layer_totals([0])[0][0].to(torch.float32)


def random_problem(seed, case, storage, layout, device=DEVICE, as_bytes=True):
    generator = torch.Generator().manual_seed(seed)
    num_q_heads, num_kv_heads, head_dim, block_size = case
    dtype, fp8_format, k_scale = storage
    rows = int(torch.randint(1, 40, (), generator=generator))
    key_start = int(torch.randint(0, 3 * block_size, (), generator=generator))
    num_keys = int(torch.randint(1, 6 * block_size, (), generator=generator))
    # Keys spread like real ones (a few large channels), so the softmax is not flat.
    keys = torch.randn(key_start + num_keys + rows, num_kv_heads, head_dim, generator=generator) \
        * torch.rand(head_dim, generator=generator) * 3
    paged = make_paged_keys(keys, layout, block_size, generator, dtype=dtype, fp8_format=fp8_format,
                            k_scale=k_scale, as_bytes=as_bytes, device=device)
    query = (torch.randn(rows, num_q_heads, head_dim, generator=generator) * 2).to(dtype)
    scale = head_dim**-0.5
    expected = oracle(query, paged.keys[key_start : key_start + num_keys], scale)
    query = query.to(device)
    return query, paged, key_start, num_keys, scale, expected


def test_the_kernel_is_built():
    # setup.py always builds the CPU one (the CUDA one where a toolkit is found); without
    # it every capture would run the torch path.
    assert kernel_status(DEVICE) == "kernel"


@pytest.mark.parametrize("layout", list(KeyLayout), ids=lambda layout: layout.name)
@pytest.mark.parametrize("storage", STORAGE, ids=lambda s: f"{str(s[0])[6:]}-{s[1] or 'plain'}")
def test_kernel_equals_the_oracle(layout, storage):
    for case in CASES:
        seed = fresh_seed()
        query, paged, key_start, num_keys, scale, expected = random_problem(seed, case, storage, layout)
        poison = torch.rand(num_keys, device=DEVICE) * 100  # sums already there: the kernel adds to them
        out = poison.clone()
        video_key_colsum(query, paged.key_cache, layout, paged.block_table, key_start, num_keys, scale, out,
                         k_scale=paged.k_scale, fp8_format=paged.fp8_format)
        message = f"case {case}, seed {seed}"
        assert torch.isfinite(out).all(), message  # a read of a slot the video does not own is NaN
        torch.testing.assert_close((out - poison).cpu(), expected, rtol=2e-4, atol=2e-5, msg=lambda m: f"{message}: {m}")
        # Each (row, head) pair's probabilities sum to one.
        total = query.shape[0] * query.shape[1]
        assert abs(float((out - poison).sum()) - total) < 1e-3 * total, message


@pytest.mark.parametrize("layout", list(KeyLayout), ids=lambda layout: layout.name)
def test_the_torch_path_equals_the_oracle_and_reads_fp8_dtypes(layout):
    seed = fresh_seed()
    storage = (torch.bfloat16, "e4m3", 0.5)
    query, paged, key_start, num_keys, scale, expected = random_problem(seed, CASES[1], storage, layout,
                                                                        as_bytes=False)
    assert paged.key_cache.dtype == torch.float8_e4m3fn  # the format comes from the dtype
    got = video_key_colsum_torch(query, paged.key_cache, layout, paged.block_table, key_start, num_keys, scale,
                                 k_scale=paged.k_scale)
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"seed {seed}: {m}")
    out = torch.zeros(num_keys, device=DEVICE)
    video_key_colsum(query, paged.key_cache, layout, paged.block_table, key_start, num_keys, scale, out,
                     k_scale=paged.k_scale)
    torch.testing.assert_close(out.cpu(), expected, rtol=2e-4, atol=2e-5, msg=lambda m: f"seed {seed}: {m}")


def test_a_long_video_and_many_queries():
    # More keys than the kernel's tiles and rows than its tasks, 7B geometry, bf16.
    seed = fresh_seed()
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(3000, 4, 128, generator=generator)
    paged = make_paged_keys(keys, KeyLayout.TRANSPOSED, 128, generator, dtype=torch.bfloat16, device=DEVICE)
    query = torch.randn(64, 28, 128, generator=generator).to(torch.bfloat16)
    expected = oracle(query, paged.keys[37:2937], 128**-0.5)
    out = torch.zeros(2900, device=DEVICE)
    video_key_colsum(query.to(DEVICE), paged.key_cache, KeyLayout.TRANSPOSED, paged.block_table, 37, 2900,
                     128**-0.5, out)
    torch.testing.assert_close(out.cpu(), expected, rtol=2e-4, atol=1e-5, msg=lambda m: f"seed {seed}: {m}")


@pytest.mark.skipif(DEVICE != "cpu", reason="the CPU kernel's messages")
def test_clear_errors():
    generator = torch.Generator().manual_seed(0)
    paged = make_paged_keys(torch.randn(40, 2, 64), KeyLayout.ROWS, 16, generator, dtype=torch.float32)
    query, out = torch.randn(3, 4, 64), torch.zeros(20)
    with pytest.raises(RuntimeError, match="block_table must be 1-D with more than 3 entries, got \\[2\\]"):
        video_key_colsum(query, paged.key_cache, KeyLayout.ROWS, paged.block_table[:2], 30, 20, 0.1, out)
    with pytest.raises(RuntimeError, match="query heads 3 must be a multiple of the cache's kv heads 2"):
        video_key_colsum(torch.randn(3, 3, 64), paged.key_cache, KeyLayout.ROWS, paged.block_table, 0, 20, 0.1, out)
    with pytest.raises(RuntimeError, match=r"out must be a contiguous float32 \[20\]"):
        video_key_colsum(query, paged.key_cache, KeyLayout.ROWS, paged.block_table, 0, 20, 0.1, torch.zeros(19))
    with pytest.raises(ValueError, match="fp8_format must be one of"):
        video_key_colsum(query, paged.key_cache, KeyLayout.ROWS, paged.block_table, 0, 20, 0.1, out, fp8_format="e3m4")
    bad_table = paged.block_table.clone()
    bad_table[0] = 10_000
    with pytest.raises(RuntimeError, match="block id 10000 of position 0 is outside the cache"):
        video_key_colsum(query, paged.key_cache, KeyLayout.ROWS, bad_table, 0, 20, 0.1, out)
