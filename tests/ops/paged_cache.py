"""A paged key cache in each layout vLLM's attention backends write, for the kernel tests.

The cache is the backend's key view ``[blocks, H_kv, block_size, d]`` carved out of a
``[blocks, H_kv, block_size, 2d]`` tensor (keys and values side by side, as vLLM
allocates it), every slot first poisoned with NaN so that a read of any slot the
video does not own shows up in the result. The block table is a random permutation
of block ids with unused blocks in between (non-contiguous).
"""

from __future__ import annotations

import dataclasses

import torch

from hippo_vllm.ops import KeyLayout

FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


@dataclasses.dataclass
class PagedKeys:
    key_cache: torch.Tensor  # the backend's key view
    block_table: torch.Tensor  # int32 [blocks of the request]
    keys: torch.Tensor  # float32 [positions, H_kv, d] as the cache holds them (fp8: dequantised)
    k_scale: float = 1.0
    fp8_format: str | None = None


def element_offsets(layout: KeyLayout, block_size: int, head_dim: int, offsets: torch.Tensor) -> torch.Tensor:
    """[N, d] offsets of each key's channels inside its (block, head) region (the packed layouts)."""
    channels = torch.arange(head_dim)
    if layout == KeyLayout.TRANSPOSED:
        return channels[None, :] * block_size + offsets[:, None]
    return ((offsets[:, None] // 16) * (head_dim // 2) + channels[None, :] // 2) * 32 \
        + (offsets[:, None] % 16) * 2 + channels[None, :] % 2


def make_paged_keys(
    keys: torch.Tensor,
    layout: KeyLayout,
    block_size: int,
    generator: torch.Generator,
    *,
    dtype: torch.dtype,
    fp8_format: str | None = None,
    k_scale: float = 1.0,
    as_bytes: bool = True,
    device: str = "cpu",
) -> PagedKeys:
    """Write ``keys`` [positions, H_kv, d] (positions 0..P-1 of one request) into a fresh cache."""
    positions, num_kv_heads, head_dim = keys.shape
    used = -(-positions // block_size)
    num_blocks = 2 * used + 3
    block_ids = torch.randperm(num_blocks, generator=generator)[:used].to(torch.int32)
    if fp8_format is not None:
        stored = (keys / k_scale).to(FP8_DTYPES[fp8_format])
        dequantised = stored.to(torch.float32) * k_scale
        stored = stored.view(torch.uint8)
        storage_dtype = torch.uint8
    else:
        stored = keys.to(dtype)
        dequantised = stored.to(torch.float32)
        storage_dtype = dtype
    whole = torch.empty(num_blocks, num_kv_heads, block_size, 2 * head_dim, dtype=storage_dtype)
    whole.view(torch.uint8).fill_(0xFF)  # NaN in every float format (0xFF.. is a NaN pattern)
    if layout == KeyLayout.ROWS:
        key_cache = whole[..., :head_dim]
        pos = torch.arange(positions)
        key_cache[block_ids[pos // block_size].long(), :, pos % block_size, :] = stored
    else:
        # vLLM's CPU view: [blocks, H_kv, 2 * block_size, d] split into keys and values.
        key_cache = whole.view(num_blocks, num_kv_heads, 2 * block_size, head_dim)[:, :, :block_size, :]
        region = whole.view(num_blocks, num_kv_heads, 2 * block_size * head_dim)
        pos = torch.arange(positions)
        inner = element_offsets(layout, block_size, head_dim, pos % block_size)  # [P, d]
        blocks = block_ids[pos // block_size].long()
        for head in range(num_kv_heads):
            region[blocks[:, None], head, inner] = stored[:, head, :]
    if device != "cpu":  # the same view of the whole cache, moved
        whole = whole.to(device)
        key_cache = whole.as_strided(key_cache.shape, key_cache.stride(), key_cache.storage_offset())
        block_ids = block_ids.to(device)
    if fp8_format is not None and not as_bytes:
        key_cache = key_cache.view(FP8_DTYPES[fp8_format])
    return PagedKeys(key_cache, block_ids, dequantised, k_scale, fp8_format)
