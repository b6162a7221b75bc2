"""The capture reads keys back from the cache vLLM's own CPU attention backend writes.

vLLM's C++ writer (``CPUAttentionBackendImpl.do_kv_cache_update``) fills a real cache
for each ISA layout hippo reads (``vec``, ``vec16``, ``amx``; fp8 with a key scale),
through a non-contiguous block table; the key reader must pass its probe and s_attn
from that cache must equal the torch oracle. A layout guess that does not match, an
ISA, cache dtype or scale hippo does not know, are refused. With an fp8 KV cache vLLM
0.33 hands ``impl.forward`` an fp8 query divided by the query scale: the capture
must score the query the model computed.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

from hippo_vllm.core import AttentionScoreAccumulator
from hippo_vllm.ops import KeyLayout, gather_video_keys, video_key_colsum
from hippo_vllm.vllm.target import kv_cache_keys


def cpu_impl(num_heads, num_kv_heads, head_size, kv_cache_dtype):
    """vLLM's CPU attention impl, without the engine config its constructor reads."""
    impl = CPUAttentionBackendImpl.__new__(CPUAttentionBackendImpl)
    impl.num_heads, impl.num_kv_heads, impl.head_size = num_heads, num_kv_heads, head_size
    impl.scale, impl.kv_cache_dtype, impl.attn_type = head_size**-0.5, kv_cache_dtype, "decoder"
    return impl


def cpu_layer(isa, k_scale=1.0):
    return SimpleNamespace(isa=isa, _k_scale_float=k_scale, _v_scale_float=1.0, _k_scale=torch.tensor(k_scale),
                           _q_scale_float=1.0)


@pytest.mark.parametrize(("isa", "head_size", "dtype", "kv_cache_dtype", "k_scale"), [
    ("vec", 128, torch.bfloat16, "auto", 1.0),
    ("vec", 64, torch.float32, "auto", 1.0),
    ("vec16", 80, torch.float16, "auto", 1.0),
    ("amx", 128, torch.bfloat16, "auto", 1.0),
    ("vec", 128, torch.bfloat16, "fp8", 0.4),
    ("vec", 64, torch.float32, "fp8_e5m2", 3.0),
    ("amx", 64, torch.bfloat16, "fp8", 0.4),
])
def test_keys_written_by_vllms_cpu_backend_give_the_oracles_s_attn(isa, head_size, dtype, kv_cache_dtype, k_scale):
    seed = int.from_bytes(os.urandom(4), "little")
    generator = torch.Generator().manual_seed(seed)
    num_heads, num_kv_heads, block_size, prompt_len = 8, 2, 32, 150
    impl, layer = cpu_impl(num_heads, num_kv_heads, head_size, kv_cache_dtype), cpu_layer(isa, k_scale)
    fp8 = kv_cache_dtype != "auto"
    num_blocks = 2 * -(-prompt_len // block_size) + 1
    kv_cache = torch.zeros(num_blocks, num_kv_heads, block_size, 2 * head_size, dtype=torch.uint8 if fp8 else dtype)
    table = torch.randperm(num_blocks, generator=generator)[: -(-prompt_len // block_size)].to(torch.int32)
    keys = torch.randn(prompt_len, num_kv_heads, head_size, generator=generator).to(dtype)
    positions = torch.arange(prompt_len)
    slots = table[positions // block_size].long() * block_size + positions % block_size
    impl.do_kv_cache_update(layer, keys, torch.zeros_like(keys), kv_cache, slots)

    reader = kv_cache_keys.guess_reader(layer, impl)
    kv_cache_keys.probe(reader, layer, impl, kv_cache, dtype)
    video_start, video_len = 21, 100
    query = torch.randn(12, num_heads, head_size, generator=generator).to(dtype)
    out = torch.zeros(video_len)
    video_key_colsum(query, reader.key_view(kv_cache, head_size), reader.layout, table, video_start, video_len,
                     impl.scale, out, k_scale=reader.k_scale, fp8_format=reader.fp8_format)

    video_keys = keys[video_start : video_start + video_len].to(torch.float32)
    if fp8:
        # vLLM's CPU writer rounds key / k_scale to fp8 toward zero, not to nearest, so the
        # oracle scores what the cache holds, read back with torch indexing: within one fp8
        # step (e4m3 3, e5m2 2 mantissa bits) of the true keys, never larger in magnitude.
        held = gather_video_keys(reader.key_view(kv_cache, head_size), reader.layout, table, video_start,
                                 video_len, k_scale=reader.k_scale, fp8_format=reader.fp8_format)
        step = 2.0 ** -(3 if kv_cache_dtype == "fp8" else 2)
        assert ((held - video_keys).abs() <= step * video_keys.abs() + 2**-6 * k_scale).all(), seed
        assert (held.abs() <= video_keys.abs() * (1 + 1e-6)).all(), seed
        video_keys = held
    accumulator = AttentionScoreAccumulator(video_len)
    accumulator.add_layer(query, video_keys, scale=impl.scale, layer=0)
    expected = accumulator.layer_totals([0])[0][0].to(torch.float32)
    torch.testing.assert_close(out, expected, rtol=2e-4, atol=2e-5, msg=lambda m: f"seed {seed}: {m}")


def test_a_layout_that_does_not_read_back_is_refused():
    impl, layer = cpu_impl(4, 2, 64, "auto"), cpu_layer("vec")
    kv_cache = torch.zeros(4, 2, 32, 128)
    wrong = kv_cache_keys.KeyReader(KeyLayout.ROWS, True, None, 1.0)
    with pytest.raises(kv_cache_keys.UnsupportedCache, match="does not read back as layout ROWS"):
        kv_cache_keys.probe(wrong, layer, impl, kv_cache, torch.float32)


def test_unknown_isas_cache_dtypes_and_per_head_scales_are_refused():
    with pytest.raises(kv_cache_keys.UnsupportedCache, match="ISA 'neon'"):
        kv_cache_keys.guess_reader(cpu_layer("neon"), cpu_impl(4, 2, 64, "auto"))
    with pytest.raises(kv_cache_keys.UnsupportedCache, match="kv_cache_dtype 'nvfp4'"):
        kv_cache_keys.guess_reader(cpu_layer("vec"), cpu_impl(4, 2, 64, "nvfp4"))
    per_head = cpu_layer("vec")
    per_head._k_scale = torch.tensor([0.5, 0.7])
    with pytest.raises(kv_cache_keys.UnsupportedCache, match="per-head _k_scale"):
        kv_cache_keys.guess_reader(per_head, cpu_impl(4, 2, 64, "fp8"))


def test_an_fp8_query_is_dequantised_with_the_query_scale():
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(5, 4, 16, generator=generator)
    layer = SimpleNamespace(_q_scale=torch.tensor(0.25), _q_scale_float=0.25)
    quantised = (query / 0.25).to(torch.float8_e4m3fn)  # what vLLM 0.33's QuantFP8 hands impl.forward
    restored = kv_cache_keys.model_query(layer, quantised, num_kv_heads=2)
    torch.testing.assert_close(restored, query, rtol=0.07, atol=0.02)
    # Per kv-head group scales (one per kv head, shared by the group's query heads).
    grouped = SimpleNamespace(_q_scale=torch.tensor([0.25, 4.0]))
    scales = torch.tensor([0.25, 0.25, 4.0, 4.0]).view(1, 4, 1)
    restored = kv_cache_keys.model_query(grouped, (query / scales).to(torch.float8_e4m3fn), num_kv_heads=2)
    torch.testing.assert_close(restored, query, rtol=0.07, atol=0.1)
    assert kv_cache_keys.model_query(layer, query, num_kv_heads=2) is query  # not quantised: as is
