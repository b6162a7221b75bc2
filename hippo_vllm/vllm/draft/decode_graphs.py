"""CUDA graphs of the draft's decode steps, in a draft worker of its own.

The draft runs eagerly (see ``make_draft_vllm_config``), so each decode step, one
token per request, pays the launch overhead of every kernel of every layer; at
draft sizes that overhead is most of the step. In a worker of its own no
compile range or graph pool of the target's applies, so the worker captures one
FULL graph per bucketed batch size (:func:`decode_buckets`) once its KV cache
exists, and replays the smallest bucket that holds a decode batch. Prefill
pieces, mixed batches and batches above the largest bucket run eagerly.

A replay pads the batch to its bucket with rows that write no KV (slot
``PAD_SLOT_ID``) and attend to one token; their logits are dropped. The inputs
(input rows, positions, block table, sequence lengths, slots) live in
persistent buffers the graphs read; the attention metadata of each bucket is
built at capture from those buffers, by a builder that knows it runs under FULL
graphs (so FlashAttention-3 keeps its scheduler metadata in a persistent buffer
and bounds its splits), and rebuilt before each replay so such builders refresh
their buffers in place.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch

from hippo_vllm.logs import get_logger

if TYPE_CHECKING:
    from hippo_vllm.vllm.draft.engine import DraftEngine

logger = get_logger(__name__)

PAD_SLOT_ID = -1  # vllm.v1.attention.backends.utils.PAD_SLOT_ID: the KV write skips the row


def decode_buckets(max_batch: int) -> list[int]:
    """Batch sizes to capture: powers of two below ``max_batch``, then ``max_batch``."""
    if max_batch < 1:
        raise ValueError(f"max_batch={max_batch}: the largest decode graph must hold at least one request")
    sizes, size = [], 1
    while size < max_batch:
        sizes.append(size)
        size *= 2
    return [*sizes, max_batch]


def bucket_for(num_requests: int, buckets: list[int]) -> int | None:
    """The smallest captured size that holds ``num_requests`` rows; None above the largest."""
    return next((size for size in buckets if size >= num_requests), None)


class DecodeGraphs:
    """One captured decode step per bucket of ``engine``'s batch sizes (its KV cache allocated)."""

    def __init__(self, engine: DraftEngine, max_batch: int):
        from vllm.config import CUDAGraphMode
        from vllm.v1.attention.backend import AttentionCGSupport

        kv = engine.kv
        if kv is None or engine.device.type != "cuda":
            raise RuntimeError("decode graphs need the draft's KV cache allocated on a CUDA device")
        self.engine = engine
        self.buckets = decode_buckets(max_batch)
        largest, device = self.buckets[-1], engine.device
        # The builder reads the compilation config when it is made: a FULL-graph one
        # allocates its persistent buffers for up to the largest bucket.
        config = copy.copy(engine.draft_vllm_config)
        config.compilation_config = copy.copy(config.compilation_config)
        config.compilation_config.cudagraph_mode = CUDAGraphMode.FULL_DECODE_ONLY
        config.compilation_config.max_cudagraph_capture_size = largest
        config.compilation_config.cudagraph_capture_sizes = list(self.buckets)
        builder_cls = kv.backend.get_builder_cls()
        if builder_cls.get_cudagraph_support(config, kv.spec) == AttentionCGSupport.NEVER:
            raise RuntimeError(f"the draft's attention backend {kv.backend.get_name()} cannot run in CUDA graphs")
        kwargs = {"block_table_width": kv.table_width} if builder_cls.requires_block_table_width else {}
        self.builder = builder_cls(kv.spec, kv.layer_names, config, device, **kwargs)
        self.rows = torch.zeros(largest, engine.row_width, dtype=engine.dtype, device=device)
        self.positions = torch.zeros(3, largest, dtype=torch.int64, device=device)
        self.block_table = torch.zeros(largest, kv.table_width, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(largest, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(largest + 1, dtype=torch.int32, device=device)
        self.slot_mapping = torch.full((largest,), PAD_SLOT_ID, dtype=torch.int64, device=device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: dict[int, torch.Tensor] = {}
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.buckets):  # largest first: the smaller ones fit in its pool
            self._capture(size, pool)
        logger.info("hippo: draft decode steps captured as CUDA graphs for batch sizes %s", self.buckets)

    def _common(self, size: int, seq_lens_cpu: torch.Tensor):
        from vllm.v1.attention.backend import CommonAttentionMetadata

        return CommonAttentionMetadata(
            query_start_loc=self.query_start_loc[: size + 1],
            query_start_loc_cpu=torch.arange(size + 1, dtype=torch.int32),
            seq_lens=self.seq_lens[:size],
            num_reqs=size,
            num_actual_tokens=size,
            max_query_len=1,
            max_seq_len=int(seq_lens_cpu.max()),
            block_table_tensor=self.block_table[:size],
            slot_mapping=self.slot_mapping[:size],
            causal=True,
            seq_lens_cpu_upper_bound=seq_lens_cpu,
        )

    def _step(self, size: int, metadata) -> torch.Tensor:
        """The draft's forward over the buffers' first ``size`` rows: float32 logits."""
        from vllm.forward_context import set_forward_context

        engine = self.engine
        names = engine.kv.layer_names
        positions = self.positions[:, :size] if engine.uses_mrope else self.positions[0, :size]
        with set_forward_context({n: metadata for n in names}, engine.draft_vllm_config, num_tokens=size,
                                 slot_mapping={n: self.slot_mapping[:size] for n in names}):
            hidden = engine.model(input_ids=None, positions=positions,
                                  inputs_embeds=self.rows[:size, : engine.hidden_size])
        return engine.model.compute_logits(hidden).float()

    def _capture(self, size: int, pool) -> None:
        # Sequence lengths up to the model's: the kernels' launch bounds hold for any replay.
        upper = torch.full((size,), self.engine.kv.max_model_len, dtype=torch.int32)
        metadata = self.builder.build_for_cudagraph_capture(self._common(size, upper))
        with self.engine._as_draft():
            self._step(size, metadata)  # once eagerly: lazy allocations happen outside the graph
            torch.cuda.synchronize(self.engine.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._logits[size] = self._step(size, metadata)
        self._graphs[size] = graph

    def covers(self, query_lens: list[int]) -> bool:
        """Whether a batch with these query lengths replays a graph (decodes only, a bucket holds it)."""
        return all(n == 1 for n in query_lens) and bucket_for(len(query_lens), self.buckets) is not None

    def run(self, req_ids: list[str], rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits ``[R, vocab]`` of one decode token per request (KV already reserved), replayed.

        ``rows``: ``[R, row_width]`` input rows; ``positions``: ``[3, R]``.
        """
        engine, num = self.engine, len(req_ids)
        size = bucket_for(num, self.buckets)
        table, seq_lens, slots = engine.kv.batch_rows(req_ids, [1] * num)
        self.block_table[:size].zero_()
        self.block_table[:num].copy_(table, non_blocking=True)
        self.seq_lens[:size].fill_(1)
        self.seq_lens[:num].copy_(seq_lens, non_blocking=True)
        self.slot_mapping[:size].fill_(PAD_SLOT_ID)
        self.slot_mapping[:num].copy_(slots, non_blocking=True)
        self.rows[num:size].zero_()
        self.rows[:num].copy_(rows)
        self.positions[:, num:size].zero_()
        self.positions[:, :num].copy_(positions)
        padded = torch.ones(size, dtype=torch.int32)
        padded[:num] = seq_lens
        self.builder.build(common_prefix_len=0, common_attn_metadata=self._common(size, padded))
        if engine.deepstack_levels:
            # Qwen3-VL's forward adds these buffer rows to its first layers and clears them.
            deepstack = self.rows[:size, engine.hidden_size :].reshape(size, engine.deepstack_levels, -1)
            engine.model._set_deepstack_input_embeds(deepstack.permute(1, 0, 2))
        self._graphs[size].replay()
        return self._logits[size][:num]
