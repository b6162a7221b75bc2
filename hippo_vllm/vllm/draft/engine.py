"""The HIPPO draft engine: a small vision-language model run by vLLM's own model code, with its own KV cache.

The draft sees a pruned video (``docs/architecture.md``, "The draft's view"): its sequence is
``text-before, kept video rows, text-after, generated tokens`` and every row keeps
its original position (M-RoPE, or 1-D for a family with plain RoPE), so generated
tokens sit where the target has them.
This module offers exactly what the proposer needs: the draft's own video
embeddings, prompt embeddings, and one batched forward that appends rows to
each request's draft KV and returns the logits of each input's last row.

How it hooks into vLLM: the model is loaded with
``get_model`` under a separate ``VllmConfig`` whose compilation config is fresh
(the target's would reject the draft's layer names as duplicates), inside
``set_current_vllm_config`` (the weight loader needs it), and runs under
``set_forward_context`` with per-layer metadata and slot mappings from
:mod:`hippo_vllm.vllm.draft.kv_cache`.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from vllm.config import VllmConfig, get_layers_from_vllm_config, set_current_vllm_config
from vllm.forward_context import set_forward_context
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.model_loader import get_model
from vllm.multimodal.utils import group_and_batch_mm_kwargs
from vllm.utils.math_utils import cdiv

from hippo_vllm.vllm.draft.batching import consecutive_groups
from hippo_vllm.vllm.draft.decode_graphs import DecodeGraphs
from hippo_vllm.vllm.draft.draft_input import DraftInput
from hippo_vllm.vllm.draft.draft_config import make_draft_vllm_config, tokenizer_length
from hippo_vllm.vllm.draft.kv_cache import DraftBatch, DraftCapacityError, DraftKVCache, draft_kv_bytes_per_token
from hippo_vllm.vllm.draft.prompt_rows import PromptToEmbed, merge_inputs
from hippo_vllm.vllm.draft.token_forwards import TokenForwards, in_request_order
from hippo_vllm.vllm.model_families import family_of
from hippo_vllm.vllm.tensor_parallel import draft_tensor_parallel

__all__ = ["DraftCapacityError", "DraftEngine", "DraftInput"]


class DraftEngine(TokenForwards):
    """A vision-language draft (see model_families) with a private paged KV cache, batched over requests.

    Each request's draft sequence is addressed by compact index 0..length-1
    (KV slots); positions are whatever the caller passes. ``run`` is the only
    method that changes KV contents; ``truncate``/``free`` only move blocks.

    ``tensor_parallel_group``: under tensor parallelism, the one-rank group the
    draft is built and run in (``tensor_parallel.make_draft_group``); None keeps
    vLLM's own group.

    The KV cache is allocated with ``num_blocks`` at construction, or later with
    :meth:`allocate_kv_cache` once its size is known (``kv_bytes_per_token``
    tells what each token costs); nothing runs before it exists.
    """

    def __init__(
        self,
        target_vllm_config: VllmConfig,
        draft_model: str | Path,
        *,
        num_blocks: int | None = None,
        block_size: int = 32,
        dtype: torch.dtype | str | None = None,
        tensor_parallel_group=None,
    ) -> None:
        self.tensor_parallel_group = tensor_parallel_group
        self.draft_vllm_config = make_draft_vllm_config(target_vllm_config, draft_model, dtype)
        model_config = self.draft_vllm_config.model_config
        self.device = torch.device(self.draft_vllm_config.device_config.device)
        self.dtype = model_config.dtype
        self.uses_mrope = model_config.uses_mrope  # else the model takes 1-D positions
        self.hidden_size = model_config.get_hidden_size()
        self.vocab_size = model_config.get_vocab_size()
        # Rows past the tokenizer's ids are embedding padding (Qwen2.5-VL-3B: 151,936 rows
        # for 151,665 tokens): the draft never proposes them.
        self.proposable_ids = min(self.vocab_size, tokenizer_length(target_vllm_config.model_config))
        self.block_size = block_size
        self.kv: DraftKVCache | None = None
        self.decode_graphs: DecodeGraphs | None = None  # see capture_decode_graphs
        # Rows of items encoded together (embed_multimodal): those of the batch vLLM's profiling
        # encodes, once measured (measure_headroom); until then the draft's prefill piece, its
        # largest forward.
        sched = target_vllm_config.scheduler_config
        self.encode_batch_rows = min(sched.max_num_batched_tokens, model_config.max_model_len)
        cfg = self.draft_vllm_config
        with self._as_draft():
            self.model = get_model(vllm_config=cfg)
            self.deepstack_levels = _deepstack_levels(self.model, model_config)
            # A prompt row: its input embedding, then one hidden-wide feature per DeepStack level.
            self.row_width = self.hidden_size * (1 + self.deepstack_levels)
            # Layers without a KV spec (encoder-only attention) keep no cache.
            self._kv_layers = {
                name: layer
                for name, layer in get_layers_from_vllm_config(cfg, Attention).items()
                if layer.get_kv_cache_spec(cfg) is not None
            }
            self.kv_bytes_per_token = draft_kv_bytes_per_token(cfg, self._kv_layers, block_size)
        if num_blocks is not None:
            self.allocate_kv_cache(num_blocks)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """Allocate the draft's KV cache: ``num_blocks`` blocks of ``block_size`` tokens."""
        if self.kv is not None:
            raise RuntimeError(f"the draft KV cache is already allocated ({self.kv.num_blocks} blocks)")
        cfg = self.draft_vllm_config
        with self._as_draft():
            self.kv = DraftKVCache(
                cfg, self._kv_layers, num_blocks=num_blocks, block_size=self.block_size, device=self.device
            )

    def capture_decode_graphs(self, max_batch: int) -> None:
        """Replay decode steps of up to ``max_batch`` requests from CUDA graphs (see decode_graphs).

        For a draft in a worker of its own, on CUDA, once its KV cache exists.
        """
        with self._as_draft():
            self.decode_graphs = DecodeGraphs(self, max_batch)

    HEADROOM_REQUEST = "hippo-headroom"

    @torch.inference_mode()
    def measure_headroom(self, num_tokens: int, mm_batch: dict[str, Any] | None = None) -> int:
        """Device bytes a draft step takes beyond its weights and KV cache, measured.

        Runs what the draft's largest step runs: the vision encoder on ``mm_batch``
        (batched kwargs of the items encoded at once, e.g. the batch vLLM's profile run
        encodes; later steps encode their items together up to those rows) and a prefill
        of ``num_tokens`` rows (the draft's prefill piece), in a throwaway KV cache
        of just those rows, and returns the peak allocation above what was
        allocated before. vLLM's profile run measured the target's activations
        only, so without this the draft's would come out of the target's KV
        memory at the first long video. 0 on a device without allocator
        statistics (CPU: vLLM's KV space there is a fixed setting, not what
        profiling left free); the forward runs all the same.
        """
        if self.kv is not None:
            raise RuntimeError("measure_headroom runs before the draft's KV cache is allocated")
        stats = torch.cuda if self.device.type == "cuda" else None
        self.allocate_kv_cache(cdiv(num_tokens, self.block_size))
        try:
            if stats is not None:
                stats.synchronize(self.device)
                stats.reset_peak_memory_stats(self.device)
                before = stats.memory_allocated(self.device)
            if mm_batch:
                with self._as_draft():
                    out = self.model.embed_multimodal(**mm_batch)
                # Items are encoded together up to these items' rows: the memory measured here.
                self.encode_batch_rows = sum(int(e.shape[0]) for e in out)
            ids = torch.arange(num_tokens, dtype=torch.long) % self.proposable_ids
            positions = torch.arange(num_tokens, dtype=torch.long).expand(3, -1).clone()
            self.run([DraftInput(self.HEADROOM_REQUEST, positions, token_ids=ids)])
            if stats is None:
                return 0
            stats.synchronize(self.device)
            return max(0, stats.max_memory_allocated(self.device) - before)
        finally:
            # The next allocate_kv_cache binds the real cache to the layers (and drops this one).
            self.kv = None

    @contextlib.contextmanager
    def _as_draft(self) -> Iterator[None]:
        """vLLM's current config and TP group are the draft's while its model is built or run."""
        with set_current_vllm_config(self.draft_vllm_config), draft_tensor_parallel(self.tensor_parallel_group):
            yield

    # -- bookkeeping (see DraftKVCache) ------------------------------------------------

    @property
    def num_requests(self) -> int:
        return self.kv.num_requests

    @property
    def num_used_blocks(self) -> int:
        return self.kv.num_used_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.kv.num_free_blocks

    def has_room_for(self, num_tokens: int) -> bool:
        """Whether a new request of ``num_tokens`` tokens fits in the free draft KV now."""
        return self.kv.has_room_for(num_tokens)

    def length(self, req_id: str) -> int:
        """Tokens in the request's draft KV (0 if unknown)."""
        return self.kv.length(req_id)

    def truncate(self, req_id: str, length: int) -> None:
        """Roll the request back to its first ``length`` tokens (e.g. after rejected drafts)."""
        self.kv.truncate(req_id, length)

    def free(self, req_id: str) -> None:
        """Forget the request and release its blocks (no-op if unknown)."""
        self.kv.free(req_id)

    # -- embeddings --------------------------------------------------------------------

    @torch.inference_mode()
    def embed_multimodal(self, mm_features) -> list[torch.Tensor]:
        """The draft's own vision encoder on items: one ``[n_i, hidden]`` per item.

        ``mm_features`` are vLLM ``MultiModalFeatureSpec`` (``runner.requests[rid].mm_features``),
        of one request or several; output order is input order. Consecutive items are
        encoded together while their placeholder rows add up to no more than
        ``encode_batch_rows`` (the rows of the items the draft's working memory was measured
        with): items together hold all their vision activations at once, memory vLLM's
        profiling never counted for the draft, so a larger group is split.
        """
        for f in mm_features:
            if f.data is None:
                raise ValueError(
                    f"multimodal item {f.identifier} of modality {f.modality} has no data; the draft "
                    "needs the raw inputs (read mm_features in the worker after the cache refilled them)"
                )
        embeds: list[torch.Tensor] = []
        with self._as_draft():
            rows_of = lambda f: f.mm_position.length  # noqa: E731 - the item's placeholder rows
            for group in consecutive_groups(list(mm_features), rows_of, self.encode_batch_rows):
                items = [(f.modality, f.data) for f in group]
                for modality, num_items, batch in group_and_batch_mm_kwargs(items, device=self.device):
                    out = self.model.embed_multimodal(**batch)
                    if len(out) != num_items:
                        raise RuntimeError(
                            f"draft encoder gave {len(out)} {modality} embeddings for {num_items} items")
                    embeds.extend(out)
        return embeds

    @torch.inference_mode()
    def embed_prompt(
        self, token_ids: torch.Tensor, mm_features, item_embeds: list[torch.Tensor] | None = None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[P, row_width]`` draft input rows of a prompt of ``P`` token ids (or of its ``rows``).

        Token embeddings, with each item's embeddings placed at its placeholder rows
        (``mm_position``; only rows with ``is_embed`` when it is set).
        ``item_embeds`` (in ``mm_features`` order) defaults to ``embed_multimodal(mm_features)``.
        A DeepStack draft (Qwen3-VL) gives each row its DeepStack features after its
        embedding (zeros on text rows), so that a subset of rows keeps exactly its own.
        ``rows`` (ascending prompt rows, e.g. a view's kept rows) embeds only those: a
        pruned view of a long video never materialises the whole prompt's rows.
        """
        mm_features = list(mm_features or ())
        if mm_features and item_embeds is None:
            item_embeds = self.embed_multimodal(mm_features)
        return self.embed_prompts([PromptToEmbed(token_ids, mm_features, list(item_embeds or ()), rows)])[0]

    @torch.inference_mode()
    def embed_prompts(self, prompts: list[PromptToEmbed]) -> list[torch.Tensor]:
        """:meth:`embed_prompt` of several prompts (their items already encoded) in one
        embedding call: each prompt gets exactly the rows it gets alone (``prompt_rows``)."""
        if not prompts:
            return []
        merges = [merge_inputs(prompt, self.device) for prompt in prompts]
        ids = torch.cat([m.ids for m in merges])
        item_rows = [rows for m in merges for rows in m.item_rows]
        with self._as_draft():
            if not item_rows:
                embeds = self._with_deepstack(self.model.embed_input_ids(ids), None)
            else:
                is_mm = torch.cat([m.is_mm for m in merges]).to(self.device)
                embeds = self.model.embed_input_ids(ids, item_rows, is_multimodal=is_mm)
                embeds = self._with_deepstack(embeds, self._take_deepstack(ids.shape[0]))
        if len(merges) == 1:
            return [embeds]
        # Each its own storage: a request's kept rows must not hold the others' alive.
        return [part.clone() for part in embeds.split([m.num_rows for m in merges])]

    def _take_deepstack(self, num_rows: int) -> torch.Tensor | None:
        """``[num_rows, levels * hidden]``: the DeepStack features vLLM's ``embed_input_ids`` just
        left in the model's buffer for the forward that follows it; the buffer is cleared.

        The draft runs a pruned subset of these rows, in other forwards, so the features
        leave the buffer here and travel with their rows (``_forward`` puts them back).
        """
        if not self.deepstack_levels:
            return None
        buffers = self.model.deepstack_input_embeds
        features = torch.cat([b[:num_rows] for b in buffers], dim=-1).clone()
        self.model._clear_deepstack_input_embeds(num_rows)
        return features

    def _with_deepstack(self, embeds: torch.Tensor, deepstack: torch.Tensor | None) -> torch.Tensor:
        if not self.deepstack_levels:
            return embeds
        if deepstack is None:
            deepstack = embeds.new_zeros(embeds.shape[0], self.row_width - self.hidden_size)
        return torch.cat([embeds, deepstack.to(embeds.dtype)], dim=-1)

    # -- forward -----------------------------------------------------------------------

    @torch.inference_mode()
    def run(self, inputs: list[DraftInput]) -> torch.Tensor:
        """One batched forward; returns float32 ``[R, vocab]`` logits of each input's last row.

        Each input's rows are appended to its request's draft KV at the request's
        current length (a new request starts at 0) and attend causally to the
        request's whole draft KV. Inputs may mix prefill chunks and single tokens.
        Raises ``DraftCapacityError`` (state unchanged) if blocks run out; if the
        forward itself fails, lengths are rolled back too.
        """
        if not inputs:
            raise ValueError("DraftEngine.run needs at least one input")
        req_ids = [inp.req_id for inp in inputs]
        if len(set(req_ids)) != len(req_ids):
            raise ValueError(f"one input per request and forward, got {req_ids}")
        for inp in inputs:
            if inp.inputs_embeds is not None and inp.inputs_embeds.shape[1] != self.row_width:
                raise ValueError(
                    f"DraftInput {inp.req_id!r}: inputs_embeds width {inp.inputs_embeds.shape[1]} "
                    f"!= the draft's row width {self.row_width} (hidden size {self.hidden_size}, "
                    f"{self.deepstack_levels} DeepStack levels)"
                )
        return self._run_batch(req_ids, [inp.num_rows for inp in inputs], lambda order: self._forward(inputs, order))

    def _run_batch(self, req_ids: list[str], query_lens: list[int], forward) -> torch.Tensor:
        """Reserve each request's new rows, then ``forward(order)`` (``order``: the batch order the
        backend needs, see :meth:`_batch_order`); on any failure the reservation is undone."""
        with self._undone_on_failure(req_ids):
            self.kv.reserve({r: self.kv.length(r) + n for r, n in zip(req_ids, query_lens)})
            with self._as_draft():
                return forward(self._batch_order(query_lens))

    @contextlib.contextmanager
    def _undone_on_failure(self, req_ids: list[str]) -> Iterator[None]:
        """If the block fails, every request goes back to its length before it (a new one is
        freed): KV rows past the old lengths may be half written."""
        old_lengths = {r: self.kv.length(r) for r in req_ids if r in self.kv}
        try:
            yield
        except BaseException:
            for r in req_ids:
                if r in old_lengths:
                    self.kv.truncate(r, old_lengths[r])
                else:
                    self.kv.free(r)
            raise

    def _batch_order(self, query_lens: list[int]) -> list[int]:
        order = list(range(len(query_lens)))
        threshold = self.kv.builder.reorder_batch_threshold
        if threshold is not None:
            # Backends with a threshold (e.g. FLASHINFER; not CPU_ATTN) split the batch
            # into decodes and prefills assuming the short queries come first.
            order.sort(key=lambda i: query_lens[i] > threshold)
        return order

    def _forward(self, inputs: list[DraftInput], order: list[int]) -> torch.Tensor:
        reordered = order != sorted(order)
        batch_inputs = [inputs[i] for i in order] if reordered else inputs
        rows = self._embed_rows(batch_inputs)
        positions = torch.cat([inp.positions for inp in batch_inputs], dim=1).to(self.device, torch.int64)
        logits = self._forward_rows([inp.req_id for inp in batch_inputs], [inp.num_rows for inp in batch_inputs],
                                    rows, positions)
        # Back to input order (most batches were never reordered).
        return in_request_order(logits, order)

    def _forward_rows(self, req_ids: list[str], query_lens: list[int], rows: torch.Tensor,
                      positions: torch.Tensor, batch: DraftBatch | None = None) -> torch.Tensor:
        """Logits of each request's last row: ``rows`` ``[N, row_width]`` (or ``[N]`` token ids) and
        ``positions`` ``[3, N]`` of the requests in batch order, ``query_lens`` rows each (already
        reserved; ``batch``: their metadata, if already built)."""
        graphs = self.decode_graphs is not None and self.decode_graphs.covers(query_lens)
        if rows.dim() == 1 and (graphs or self.deepstack_levels):
            # Graphs replay input rows; a DeepStack forward takes its (here zero) features with them.
            rows = self._with_deepstack(self.model.embed_input_ids(rows), None)
        if graphs:
            return self._proposable(self.decode_graphs.run(req_ids, rows, positions).clone())
        # Token ids go into the forward, which embeds them itself, as vLLM's own drafts run.
        ids, embeds = (rows, None) if rows.dim() == 1 else (None, rows[:, : self.hidden_size])
        if self.deepstack_levels:
            # vLLM's Qwen3-VL forward adds its buffer's first N rows to the first decoder
            # layers' outputs (and clears them): fill it with exactly this batch's rows.
            deepstack = rows[:, self.hidden_size :].reshape(rows.shape[0], self.deepstack_levels, -1)
            self.model._set_deepstack_input_embeds(deepstack.permute(1, 0, 2))
        if not self.uses_mrope:
            positions = positions[0]  # a 1-D family's three rows are equal
        if batch is None:
            batch = self.kv.build_batch(req_ids, query_lens)
        # Callers run this under _as_draft: the current config is the draft's during the forward,
        # so custom ops and backends that consult it see the draft's (not the target's) settings.
        with set_forward_context(batch.attn_metadata, self.draft_vllm_config, num_tokens=batch.num_tokens,
                                 slot_mapping=batch.slot_mapping):
            hidden = self.model(input_ids=ids, positions=positions, inputs_embeds=embeds)
        if len(query_lens) != hidden.shape[0]:  # not one row per input (a decode step): each one's last
            hidden = hidden[torch.tensor(list(itertools.accumulate(query_lens)), device=self.device) - 1]
        return self._proposable(self.model.compute_logits(hidden).float())

    def _proposable(self, logits: torch.Tensor) -> torch.Tensor:
        if self.proposable_ids < logits.shape[-1]:
            # The lowest finite value, not -inf: never the argmax, and differences stay finite.
            logits[:, self.proposable_ids :] = torch.finfo(logits.dtype).min
        return logits

    def _embed_rows(self, inputs: list[DraftInput]) -> torch.Tensor:
        """The inputs' rows in order: token ids embedded (in one call when all are ids), else given."""
        if all(inp.token_ids is not None for inp in inputs):
            ids = torch.cat([inp.token_ids for inp in inputs]).to(self.device, torch.int64)
            return self._with_deepstack(self.model.embed_input_ids(ids), None)
        return torch.cat([self._embed_rows([inp]) if inp.inputs_embeds is None
                          else inp.inputs_embeds.to(self.device, self.dtype) for inp in inputs])


def _deepstack_levels(model, model_config) -> int:
    """DeepStack levels of a family that has them, checked against vLLM's model (0 for others)."""
    family = family_of(model_config.hf_config)
    if family is None or not family.deepstack:
        return 0
    levels = getattr(model, "deepstack_num_level", 0)
    if not getattr(model, "use_deepstack", False) or not levels:
        raise ValueError(
            f"{family.name} draft {model_config.model}: vLLM's {type(model).__name__} has no DeepStack "
            "buffer to fill, but the family injects DeepStack features"
        )
    return int(levels)
