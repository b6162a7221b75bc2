"""s_attn's per-layer sums read straight from a paged KV cache.

:func:`video_key_colsum` adds, for one request, layer and video, the softmax
probabilities of every (text query row, query head) pair over the video's keys
into a float32 ``[N_v]`` sum (GQA-aware); the keys are read from the cache through
the request's block table, in the layout the attention backend wrote them, fp8
keys dequantised with the layer's key scale. The per-layer mean and the mean over
layers stay with :class:`hippo_vllm.core.AttentionScoreAccumulator`.

It runs the compiled kernel for the tensors' device (``hippo_vllm._C_cpu``, always
built by ``setup.py``; ``hippo_vllm._C_cuda``, built where a CUDA toolkit and a
CUDA build of torch are present) and otherwise :func:`video_key_colsum_torch`:
the keys gathered with torch indexing and scored by the core's accumulator, the
code the kernels are tested against.
"""

from __future__ import annotations

import enum
import importlib

import torch

from hippo_vllm.core import AttentionScoreAccumulator
from hippo_vllm.logs import get_logger

logger = get_logger(__name__)


class KeyLayout(enum.IntEnum):
    """How keys sit inside one (block, kv head) of the backend's ``[blocks, H_kv, block_size, d]`` view
    (``csrc/key_layouts.h`` holds the same numbers)."""

    ROWS = 0  # token-major rows, any strides (FlashAttention, Triton)
    TRANSPOSED = 1  # [d, block_size], contiguous (vLLM's CPU kernel, ISA "vec"/"vec16")
    VNNI16 = 2  # [block_size/16, d/2, 16, 2], contiguous (vLLM's CPU kernel, ISA "amx")


FP8_FORMATS = {None: 0, "e4m3": 1, "e5m2": 2}
_FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
_EXTENSIONS = {"cpu": "hippo_vllm._C_cpu", "cuda": "hippo_vllm._C_cuda"}
_loaded: dict[str, object | None] = {}
_why_not: dict[str, str] = {}


def _extension(device_type: str):
    """The compiled module for a device type, or None (the reason kept for :func:`kernel_status`)."""
    if device_type not in _loaded:
        name = _EXTENSIONS.get(device_type)
        module = None
        if name is None:
            _why_not[device_type] = f"no hippo kernel for device type {device_type!r}"
        else:
            try:
                module = importlib.import_module(name)
            except ImportError as exc:
                _why_not[device_type] = f"{name} is not built ({exc}); see docs/kernels.md"
                logger.warning("hippo: %s; s_attn runs in torch", _why_not[device_type])
        _loaded[device_type] = module
    return _loaded[device_type]


def kernel_status(device_type: str) -> str:
    """'kernel' when the compiled kernel serves this device type, else why the torch path does."""
    return "kernel" if _extension(device_type) is not None else _why_not[device_type]


def _check_fp8(key_cache: torch.Tensor, fp8_format: str | None) -> str | None:
    if fp8_format not in FP8_FORMATS:
        raise ValueError(f"fp8_format must be one of {sorted(f for f in FP8_FORMATS if f)} or None, got {fp8_format!r}")
    for name, dtype in _FP8_DTYPES.items():
        if key_cache.dtype == dtype:
            return name
    if fp8_format is not None and key_cache.dtype != torch.uint8:
        raise ValueError(f"an fp8 key cache ({fp8_format}) must hold uint8 or fp8, got {key_cache.dtype}")
    return fp8_format


def video_key_colsum(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    layout: KeyLayout,
    block_table: torch.Tensor,
    key_start: int,
    num_keys: int,
    scale: float,
    out: torch.Tensor,
    *,
    k_scale: float = 1.0,
    fp8_format: str | None = None,
    use_kernel: bool = True,
) -> None:
    """Add into ``out`` (float32 ``[num_keys]``) the text→video softmax probabilities summed
    over the rows and heads of ``query``.

    Args:
        query: ``[L, H_q, d]`` text queries (post-RoPE, dequantised), any floating dtype.
        key_cache: the backend's key view ``[blocks, H_kv, block_size, d]``.
        layout: how the backend stores a block's keys (:class:`KeyLayout`).
        block_table: the request's block ids, 1-D.
        key_start, num_keys: the video's prompt positions ``[key_start, key_start + num_keys)``.
        scale: the attention's logit scale.
        k_scale: the layer's key scale (fp8 caches store key / k_scale).
        fp8_format: ``"e4m3"`` or ``"e5m2"`` for a uint8 cache holding fp8 keys.
        use_kernel: False forces the torch path.
    """
    fp8_format = _check_fp8(key_cache, fp8_format)
    module = _extension(query.device.type) if use_kernel else None
    if module is None:
        out += video_key_colsum_torch(query, key_cache, layout, block_table, key_start, num_keys, scale,
                                      k_scale=k_scale, fp8_format=fp8_format)
        return
    module.video_key_colsum(query, key_cache, int(layout), FP8_FORMATS[fp8_format], block_table, int(key_start),
                            int(num_keys), float(scale), float(k_scale), out)


def gather_video_keys(
    key_cache: torch.Tensor,
    layout: KeyLayout,
    block_table: torch.Tensor,
    key_start: int,
    num_keys: int,
    *,
    k_scale: float = 1.0,
    fp8_format: str | None = None,
) -> torch.Tensor:
    """The video's keys ``[num_keys, H_kv, d]`` (float32, dequantised) read with torch indexing."""
    fp8_format = _check_fp8(key_cache, fp8_format)
    num_blocks, num_kv_heads, block_size, head_dim = key_cache.shape
    positions = torch.arange(key_start, key_start + num_keys, device=key_cache.device)
    blocks = block_table.to(key_cache.device, torch.long)[positions // block_size]
    offsets = positions % block_size
    channels = torch.arange(head_dim, device=key_cache.device)
    block_stride, head_stride, token_stride, channel_stride = key_cache.stride()
    if layout == KeyLayout.ROWS:
        inner = offsets[:, None] * token_stride + channels[None, :] * channel_stride
    elif layout == KeyLayout.TRANSPOSED:
        inner = channels[None, :] * block_size + offsets[:, None]
    elif layout == KeyLayout.VNNI16:
        inner = ((offsets[:, None] // 16) * (head_dim // 2) + channels[None, :] // 2) * 32 \
            + (offsets[:, None] % 16) * 2 + channels[None, :] % 2
    else:
        raise ValueError(f"layout must be one of {[m.name for m in KeyLayout]}, got {layout!r}")
    heads = torch.arange(num_kv_heads, device=key_cache.device)
    # Element offsets [N, H_kv, d] from the view's first element, read from a flat view of its memory.
    index = (blocks * block_stride)[:, None, None] + (heads * head_stride)[None, :, None] + inner[:, None, :]
    span = int(index.max()) + 1
    keys = key_cache.as_strided((span,), (1,))[index]
    if fp8_format is not None:
        return keys.contiguous().view(_FP8_DTYPES[fp8_format]).to(torch.float32) * k_scale
    return keys.to(torch.float32)


def video_key_colsum_torch(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    layout: KeyLayout,
    block_table: torch.Tensor,
    key_start: int,
    num_keys: int,
    scale: float,
    *,
    k_scale: float = 1.0,
    fp8_format: str | None = None,
) -> torch.Tensor:
    """The torch path and oracle: keys gathered by :func:`gather_video_keys`, probabilities
    summed by the core's accumulator. Returns float32 ``[num_keys]``."""
    keys = gather_video_keys(key_cache, layout, block_table, key_start, num_keys, k_scale=k_scale,
                             fp8_format=fp8_format)
    accumulator = AttentionScoreAccumulator(num_keys)
    accumulator.add_layer(query, keys, scale=scale, layer=0)
    sums, _ = accumulator.layer_totals([0])
    return sums[0].to(torch.float32)
