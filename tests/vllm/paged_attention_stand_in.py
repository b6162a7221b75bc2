"""A stand-in for a vLLM attention backend with a paged KV cache, for the capture's unit tests.

Like FlashAttention, ``forward`` writes the step's keys into a ``[blocks, H_kv,
block_size, 2d]`` cache (token rows, key half first) at the step's slots, and
``do_kv_cache_update`` is the backend's writer (the capture's layout probe calls it).
The request's blocks are a random, non-contiguous choice of a larger cache whose
other slots hold NaN, so a read of a slot the request does not own poisons s_attn.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch


class PagedImpl:
    def __init__(self, num_heads: int, num_kv_heads: int, head_size: int, scale: float, prompt_len: int,
                 generator: torch.Generator, block_size: int = 4):
        self.num_heads, self.num_kv_heads, self.head_size, self.scale = num_heads, num_kv_heads, head_size, scale
        self.kv_cache_dtype = "auto"
        used = -(-prompt_len // block_size)
        num_blocks = 3 * used + 2
        self.kv_cache = torch.full((num_blocks, num_kv_heads, block_size, 2 * head_size), float("nan"))
        self.block_table = torch.randperm(num_blocks, generator=generator)[:used].to(torch.int32)

    def metadata(self, start: int, n: int) -> SimpleNamespace:
        """Attention metadata of a step that computes prompt positions [start, start + n)."""
        block_size = self.kv_cache.shape[2]
        positions = torch.arange(start, start + n)
        slots = self.block_table[positions // block_size].long() * block_size + positions % block_size
        return SimpleNamespace(block_table=self.block_table[None, :], slot_mapping=slots)

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping):
        block_size = kv_cache.shape[2]
        key = key.reshape(-1, self.num_kv_heads, self.head_size)
        kv_cache[slot_mapping // block_size, :, slot_mapping % block_size, : self.head_size] = key.to(kv_cache.dtype)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata):
        self.do_kv_cache_update(layer, key, value, kv_cache, attn_metadata.slot_mapping)
        return query


def run_layer(impl_owner, query: torch.Tensor, key: torch.Tensor, start: int, vllm_layer=None) -> None:
    """One layer's forward of the rows [start, start + len(query)) through the (wrapped) impl
    (``vllm_layer``: what vLLM passes as the attention layer, with its scales)."""
    impl = impl_owner.impl
    n = query.shape[0]
    impl.forward(vllm_layer, query, key, None, impl.kv_cache, impl.metadata(start, n))
