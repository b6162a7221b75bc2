"""Where a layer's keys sit in vLLM's paged KV cache, and the query as the model computed it.

The attention capture reads a video's keys straight from the cache (no copy is
kept), so it must know the attention backend's layout:

- vLLM's CPU backend (``CPUAttentionBackendImpl``) hands ``impl.forward`` a
  ``[blocks, H_kv, block_size, 2d]`` cache viewed as ``[blocks, H_kv, 2·block_size, d]``
  and split in keys and values; its C++ op stores a block's keys transposed
  (ISA ``vec``/``vec16``) or VNNI-packed (``amx``), and fp8 keys as bytes;
- FlashAttention and Triton (vLLM 0.33) take the keys as ``kv_cache[..., :d]`` of the
  logical ``[blocks, H_kv, block_size, 2d]`` view, token rows with any strides.

Each guess is checked once per capture by a probe: random keys are written into a
scratch cache with the backend's own ``do_kv_cache_update`` and read back; a
layout that does not read them back (another ISA, another backend) is refused, and
the capture then builds views without s_attn (logged once) rather than scores from
misread keys. fp8 keys are dequantised with the layer's key scale.

With an fp8 KV cache, vLLM 0.33's ``Attention.forward`` quantises the query before
``impl.forward`` when the backend takes fp8 queries (``query / q_scale`` as fp8,
``model_executor/layers/attention/attention.py`` 469-487 and 509-526);
:func:`model_query` undoes that, so s_attn runs at the model's temperature.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from hippo_vllm.logs import get_logger
from hippo_vllm.ops import KeyLayout, gather_video_keys

logger = get_logger(__name__)

_FP8_CACHE_DTYPES = {"fp8": "e4m3", "fp8_e4m3": "e4m3", "fp8_e5m2": "e5m2"}
_CPU_ISA_LAYOUTS = {"vec": KeyLayout.TRANSPOSED, "vec16": KeyLayout.TRANSPOSED, "amx": KeyLayout.VNNI16}


class UnsupportedCache(RuntimeError):
    """The layer's KV cache cannot be read back (layout, dtype or scales hippo does not know)."""


@dataclasses.dataclass(frozen=True)
class KeyReader:
    """How to read one layer's keys: the layout and dequantisation of its cache."""

    layout: KeyLayout
    cpu_packed: bool  # vLLM's CPU cache: keys in the first half of each (block, head)
    fp8_format: str | None
    k_scale: float

    def key_view(self, kv_cache: torch.Tensor, head_size: int) -> torch.Tensor:
        """The backend's key view ``[blocks, H_kv, block_size, d]`` of the layer's cache."""
        if kv_cache.dim() != 4 or kv_cache.shape[-1] != 2 * head_size:
            raise UnsupportedCache(
                f"expected a KV cache [blocks, kv_heads, block_size, 2*{head_size}], got {list(kv_cache.shape)}")
        if self.cpu_packed:
            blocks, heads, block_size, _ = kv_cache.shape
            return kv_cache.view(blocks, heads, 2 * block_size, head_size)[:, :, :block_size, :]
        return kv_cache[..., :head_size]


def fp8_format(kv_cache_dtype: str) -> str | None:
    """The fp8 format of a vLLM ``kv_cache_dtype`` ("auto" and unquantised: None)."""
    if kv_cache_dtype in _FP8_CACHE_DTYPES:
        return _FP8_CACHE_DTYPES[kv_cache_dtype]
    if kv_cache_dtype in ("auto", "bfloat16", "float16", "float32", "half", "float"):
        return None
    raise UnsupportedCache(f"kv_cache_dtype {kv_cache_dtype!r} (hippo reads auto, fp8, fp8_e4m3, fp8_e5m2)")


def _scalar_scale(layer: Any, name: str) -> float:
    """A per-tensor scale of the layer (``_k_scale``); per-head scales are not read."""
    tensor = getattr(layer, name, None)
    if isinstance(tensor, torch.Tensor) and tensor.numel() > 1:
        raise UnsupportedCache(f"per-head {name} ({tensor.numel()} values); hippo reads per-tensor scales")
    value = getattr(layer, name + "_float", None)
    return float(value) if value is not None else float(tensor) if tensor is not None else 1.0


def guess_reader(layer: Any, impl: Any) -> KeyReader:
    """The layout the backend of ``impl`` is known to write (checked by :func:`probe`)."""
    fp8 = fp8_format(getattr(impl, "kv_cache_dtype", "auto"))
    k_scale = _scalar_scale(layer, "_k_scale") if fp8 else 1.0
    isa = getattr(layer, "isa", None)
    if type(impl).__name__ == "CPUAttentionBackendImpl":
        if isa not in _CPU_ISA_LAYOUTS:
            raise UnsupportedCache(f"vLLM's CPU attention with ISA {isa!r} (hippo reads {sorted(_CPU_ISA_LAYOUTS)})")
        return KeyReader(_CPU_ISA_LAYOUTS[isa], True, fp8, k_scale)
    return KeyReader(KeyLayout.ROWS, False, fp8, k_scale)


def probe(reader: KeyReader, layer: Any, impl: Any, kv_cache: torch.Tensor, key_dtype: torch.dtype) -> None:
    """Write random keys with the backend's own op into a two-block scratch cache and
    check that ``reader`` reads them back (raises :class:`UnsupportedCache` if not)."""
    update = getattr(impl, "do_kv_cache_update", None)
    if update is None:
        return  # the backend writes its cache inside forward; the layout guess stands
    head_size, num_kv_heads = impl.head_size, impl.num_kv_heads
    scratch = torch.zeros_like(kv_cache[:2])
    block_size = kv_cache.shape[2]
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(2 * block_size, num_kv_heads, head_size, generator=generator).to(kv_cache.device, key_dtype)
    slots = torch.randperm(2 * block_size, generator=generator).to(kv_cache.device)
    update(layer, keys, torch.zeros_like(keys), scratch, slots)
    # Position p of a one-request table [0, 1] is slot p; the keys went to slot slots[i].
    read = gather_video_keys(reader.key_view(scratch, head_size), reader.layout,
                             torch.tensor([0, 1], device=kv_cache.device), 0, 2 * block_size,
                             k_scale=reader.k_scale, fp8_format=reader.fp8_format)
    expected = torch.empty_like(read)
    expected[slots] = keys.to(torch.float32)  # as written: the probe's keys in the model's dtype
    tolerance = 0.15 if reader.fp8_format else 1e-6  # fp8 keeps 2-3 mantissa bits
    if not torch.allclose(read, expected, rtol=tolerance, atol=tolerance * reader.k_scale):
        raise UnsupportedCache(
            f"{type(impl).__name__}'s KV cache does not read back as layout {reader.layout.name} "
            f"(cache shape {list(kv_cache.shape)}, dtype {kv_cache.dtype})")


def model_query(layer: Any, query: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """The query rows as the model computed them: an fp8 query (quantised by vLLM for an fp8
    KV cache as ``query / q_scale``) times the layer's query scale, else the query itself."""
    if query.element_size() != 1 or not query.is_floating_point():
        return query
    scale = getattr(layer, "_q_scale", None)
    values = query.to(torch.float32)
    if isinstance(scale, torch.Tensor) and scale.numel() == num_kv_heads and num_kv_heads > 1:
        # Per kv-head group scales: query head h shares the scale of kv head h // group.
        rows, heads, dim = values.shape
        grouped = values.view(rows, num_kv_heads, heads // num_kv_heads, dim)
        return (grouped * scale.to(values.device, torch.float32).view(1, -1, 1, 1)).view(rows, heads, dim)
    return values * _scalar_scale(layer, "_q_scale")
