"""s_attn from the target's own prefill: post-RoPE text queries against the video's cached keys.

No attention backend returns probabilities, so the text→video block is rebuilt
for each chosen layer right after its ``impl.forward``: the text queries of the
step (post-RoPE, as the model used them; Qwen2 applies M-RoPE before ``self.attn``)
against the video's keys read straight from vLLM's paged KV cache through the
request's block table (``hippo_vllm.ops.video_key_colsum``: the compiled kernel,
or its torch fallback). The keys are in the cache by then, also when the video
came in an earlier chunk of a chunked prefill, so nothing is kept between steps.
``kv_cache_keys`` knows the backends' cache layouts (checked once by a probe) and
dequantises fp8 keys and queries. The wrapper is per instance (no class patching;
listed in the patch index) and costs nothing unless a step carries a request whose
prompt prefill includes video or the text after it.

The wrapper only sees the rows of the forwards that actually call
``impl.forward``: on CUDA a step replayed from a full CUDA graph does not (a
prefill chunk of exactly the uniform-decode shape, or any step when a
compilation pass such as ``fuse_attn_quant`` forces full graphs). So the rows
each layer saw are counted, per request and video, against the rows scheduled
for its prefill; a capture with any gap is incomplete and the draft view prunes
without s_attn (counted in ``views_without_target_attention``). s_attn is never
computed from a subset of the rows, nor from keys this run did not compute.

A request whose video was not computed in this run (its prompt prefix came from
vLLM's prefix cache) is reported as incomplete and the draft view then prunes on
the visual signals alone.

Under tensor parallelism each rank sees only its own attention heads. s_attn is a
mean over (query row, head) pairs per layer, so each rank accumulates the sums of
its heads, and when a request's prefill ends every rank adds its per-layer sums,
pair counts and an incompleteness flag into one small tensor that is summed over
the TP group (:meth:`TargetAttentionCapture.sum_ended_prefills`). Every rank gets
the same scheduler output and tracks the same requests, so the ranks take part in
the same sums in the same order, and the result is what one rank holding every
head would compute (up to float rounding).

vLLM's step reaches the capture only as ``step_records`` (the scheduled prompt
rows at ``begin_step``, the batch rows at forward time) and as the arguments of
``impl.forward`` (the layer, the query, the layer's cache and attention metadata).
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Container, Iterable
from typing import Any

import torch

from hippo_vllm.core import AttentionScoreAccumulator
from hippo_vllm.logs import get_logger
from hippo_vllm.ops import video_key_colsum
from hippo_vllm.vllm.patching import patch_instance_attribute
from hippo_vllm.vllm.target import kv_cache_keys
from hippo_vllm.vllm.target.step_records import StepStart

logger = get_logger(__name__)

_LAYER_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.attn$")
PATCH_TARGET = "vllm.model_executor.layers.attention.attention:Attention.impl.forward"
# Tracked request ids -> {req_id: (batch index, first batch row, tokens computed before the step, rows scheduled)}
BatchRows = Callable[[Container[str]], dict[str, tuple[int, int, int, int]]]


@dataclasses.dataclass
class _VideoCapture:
    offset: int
    length: int
    query_positions: torch.Tensor  # prompt positions of the text after this video
    accumulator: AttentionScoreAccumulator
    missing_keys: bool = False  # text queries came before this run computed every video key
    # Rows of the prompt scheduled while tracked, and the rows each layer saw of them.
    queries_scheduled: int = 0
    keys_scheduled: int = 0
    queries_observed: dict[int, int] = dataclasses.field(default_factory=dict)  # layer -> rows
    keys_observed: dict[int, int] = dataclasses.field(default_factory=dict)  # layer -> rows
    failed: bool = False  # an error while observing: never scored

    def complete(self, layers: Iterable[int]) -> bool:
        """Every query and key row of the prompt was scheduled and seen by every layer."""
        if self.failed or self.missing_keys or len(self.query_positions) == 0:
            return False
        if self.queries_scheduled != len(self.query_positions) or self.keys_scheduled != self.length:
            return False
        return all(
            self.queries_observed.get(layer, 0) == self.queries_scheduled
            and self.keys_observed.get(layer, 0) == self.keys_scheduled
            for layer in layers
        )


@dataclasses.dataclass(frozen=True)
class _Observation:
    """What each layer of a step reads for one video: worked out once per step."""

    video: _VideoCapture
    batch_index: int  # the request's row in the attention metadata's block table
    key_rows: int  # the video's keys computed in this step
    query_rows: torch.Tensor | None  # batch rows of the text after the video (query's device); None: none
    num_queries: int


@dataclasses.dataclass
class _RequestCapture:
    prompt_len: int
    videos: list[_VideoCapture]


def text_positions_after(offset: int, length: int, prompt_len: int, mm_ranges) -> torch.Tensor:
    """Prompt positions after a video that hold text (not another mm item's rows)."""
    mask = torch.zeros(prompt_len, dtype=torch.bool)
    mask[offset + length :] = True
    for start, n in mm_ranges:
        mask[start : start + n] = False
    return torch.nonzero(mask).flatten()


class TargetAttentionCapture:
    """Accumulates s_attn per request and video across the target's prefill steps."""

    def __init__(
        self,
        attention_layers: dict[int, Any],
        layer_indices: tuple[int, ...],
        sum_over_ranks: Callable[[torch.Tensor], None] | None = None,
        on_failure: Callable[[str, BaseException, Iterable[str]], None] | None = None,
    ):
        self.layers = {i: attention_layers[i] for i in layer_indices}
        # Tensor parallelism: sums a CPU float64 tensor over the TP ranks, in place.
        self._sum_over_ranks = sum_over_ranks
        self._summed: dict[str, list[torch.Tensor | None]] = {}  # req -> s_attn summed over ranks
        self.on_failure = on_failure  # told about an error while observing (never raised)
        self._requests: dict[str, _RequestCapture] = {}
        self._step_rows: dict[str, tuple[int, int, int]] | None = None  # req -> (row, start, n)
        self._step_source = None
        self._step_plan: list[_Observation] | None = None  # this step's, from its first observed layer
        self._observing = True  # False after an error, until the next step
        self._reader: kv_cache_keys.KeyReader | None = None  # checked by a probe on first use
        self._unsupported: str | None = None  # why the cache cannot be read (then never scored)
        self.seconds = 0.0  # time computing s_attn (CUDA: measured by events, read next step)
        self._pending_events: list[tuple[Any, Any]] = []
        for index, layer in self.layers.items():
            self._wrap(index, layer.impl)

    @staticmethod
    def find_text_attention_layers(static_forward_context: dict[str, Any]) -> dict[int, Any]:
        """Decoder self-attention layers by index (the vision tower's are not matched)."""
        found = {}
        for name, layer in static_forward_context.items():
            match = _LAYER_NAME.search(name)
            if match and hasattr(layer, "impl"):
                found[int(match.group(1))] = layer
        return found

    def _wrap(self, index: int, impl: Any) -> None:
        original = impl.forward
        capture = self

        def forward(layer, query, key, value, kv_cache, attn_metadata, *args, **kwargs):
            result = original(layer, query, key, value, kv_cache, attn_metadata, *args, **kwargs)
            # After the layer's forward: its keys of this step are in the cache now (every
            # backend has written them, before or inside forward).
            if attn_metadata is not None and capture._step_source is not None and capture._observing:
                capture._observe_safely(index, layer, impl, query, key, kv_cache, attn_metadata)
            return result

        patch_instance_attribute(impl, "forward", forward, PATCH_TARGET)

    # -- request lifecycle -------------------------------------------------------------

    def track(self, req_id: str, prompt_len: int, videos: list[tuple[int, int]], mm_ranges) -> None:
        """Start accumulating for a request's videos ``[(offset, length), ...]``."""
        self._requests[req_id] = _RequestCapture(
            prompt_len,
            [
                _VideoCapture(
                    off, n, text_positions_after(off, n, prompt_len, mm_ranges),
                    AttentionScoreAccumulator(n),
                )
                for off, n in videos
            ],
        )

    def is_tracking(self, req_id: str) -> bool:
        return req_id in self._requests

    @property
    def sums_over_ranks(self) -> bool:
        """Whether s_attn is summed over tensor-parallel ranks (then every rank tracks the same requests)."""
        return self._sum_over_ranks is not None

    def finish(self, req_id: str) -> list[torch.Tensor | None] | None:
        """Final s_attn per video ([N_v] float32; None where it could not be built)."""
        if req_id in self._summed:  # tensor parallelism: summed over the ranks at prefill end
            return self._summed.pop(req_id)
        state = self._requests.pop(req_id, None)
        if state is None:
            return None
        return [video.accumulator.scores() if self._complete(video) else None for video in state.videos]

    def _complete(self, video: _VideoCapture) -> bool:
        """Whether this rank saw every row s_attn needs for the video."""
        return video.complete(self.layers)

    def drop(self, req_id: str) -> None:
        self._requests.pop(req_id, None)
        self._summed.pop(req_id, None)

    # -- per step ------------------------------------------------------------------------

    def begin_step(self, step: StepStart, batch_rows: BatchRows) -> None:
        """Count the prompt rows scheduled for tracked requests; keep ``batch_rows`` so the
        first observed layer can map rows to requests (``step_records.batch_rows``)."""
        self._step_source = batch_rows if self._requests else None
        self._step_rows = None
        self._step_plan = None
        self._observing = True
        self._collect_event_times()
        if self._requests:
            self._count_scheduled(step)

    def _count_scheduled(self, step: StepStart) -> None:
        for req_id, state in self._requests.items():
            n = step.num_scheduled_tokens.get(req_id, 0)
            start = step.computed_before.get(req_id)
            if not n or start is None:
                continue
            end = min(start + n, state.prompt_len)
            for video in state.videos:
                positions = video.query_positions
                video.queries_scheduled += int(((positions >= start) & (positions < end)).sum())
                video.keys_scheduled += max(0, min(video.offset + video.length, end) - max(video.offset, start))

    def end_step(self) -> None:
        self._step_source = None
        self._step_rows = None
        self._step_plan = None

    def take_seconds(self) -> float:
        """Time spent computing s_attn since the last call (CUDA: up to the previous step)."""
        seconds, self.seconds = self.seconds, 0.0
        return seconds

    def sum_ended_prefills(self) -> None:
        """Tensor parallelism: sum the partial s_attn of prefills that ended in this step over the ranks.

        Called by every rank after the target's forward. Requests are taken in id order
        and videos in prompt order, so all ranks lay out the summed tensor alike; each
        video contributes its per-layer probability sums and (row, head) pair counts in
        layer order, and a flag that is non-zero when some rank missed part of it.
        """
        if self._sum_over_ranks is None or self._step_source is None:
            return
        ended = sorted(
            req_id
            for req_id, (_, _, start, n) in self._rows().items()
            if n > 0 and start + n >= self._requests[req_id].prompt_len
        )
        if not ended:
            return
        layers = sorted(self.layers)
        videos = [video for req_id in ended for video in self._requests[req_id].videos]
        total = torch.cat([self._partial_totals(video, layers) for video in videos])
        self._sum_over_ranks(total)
        scores = iter(self._summed_scores(total, videos, layers))
        for req_id in ended:
            self._summed[req_id] = [next(scores) for _ in self._requests.pop(req_id).videos]

    def _partial_totals(self, video: _VideoCapture, layers: list[int]) -> torch.Tensor:
        """This rank's share of a video's s_attn, flat float64 on the CPU: sums, counts, incomplete flag.

        Its size depends only on what every rank knows alike, also on failure, so
        a failing rank still takes part in the sum (and marks the video incomplete).
        """
        try:
            sums, counts = video.accumulator.layer_totals(layers)
            incomplete = torch.tensor([0.0 if self._complete(video) else 1.0], dtype=torch.float64)
            return torch.cat([sums.cpu().flatten(), counts.cpu(), incomplete])
        except Exception:
            logger.exception("hippo: this rank's share of s_attn is lost; the video is pruned without it")
            failed = torch.zeros(len(layers) * (video.length + 1) + 1, dtype=torch.float64)
            failed[-1] = 1.0
            return failed

    @staticmethod
    def _summed_scores(total: torch.Tensor, videos: list[_VideoCapture], layers: list[int]):
        """s_attn per video from the totals summed over the ranks (None where a rank missed part)."""
        offset = 0
        for video in videos:
            size = len(layers) * video.length
            sums = total[offset : offset + size].view(len(layers), video.length)
            counts = total[offset + size : offset + size + len(layers)]
            incomplete = bool(total[offset + size + len(layers)] > 0)
            offset += size + len(layers) + 1
            if incomplete:
                yield None
                continue
            try:
                summed = AttentionScoreAccumulator(video.length)
                summed.set_layer_totals(layers, sums, counts)
                # On the device the scores would be on without TP.
                scores = summed.scores().to(video.accumulator.device)
            except Exception:
                logger.exception("hippo: s_attn summed over ranks is unusable; the video is pruned without it")
                scores = None
            yield scores

    def _rows(self) -> dict[str, tuple[int, int, int, int]]:
        # Resolved at forward time, after vLLM has (re)ordered its persistent batch.
        if self._step_rows is None:
            self._step_rows = self._step_source(self._requests)
        return self._step_rows

    def _observe_safely(self, layer_index, layer, impl, query, key, kv_cache, attn_metadata) -> None:
        """``_observe``, with any error kept out of the target's forward, and timed."""
        started, events = time.perf_counter(), None
        if query.is_cuda:  # host time would only measure the launches
            events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            events[0].record()
        try:
            self._observe(layer_index, layer, impl, query, key, kv_cache, attn_metadata)
        except Exception as exc:  # noqa: BLE001 - the target's forward must go on
            req_ids = [r for r in (self._step_rows or self._requests) if r in self._requests]
            for req_id in req_ids:
                for video in self._requests[req_id].videos:
                    video.failed = True
            self._observing = False  # for the rest of this step (tensor parallelism still sums)
            if self.on_failure is not None:
                self.on_failure("target attention capture", exc, req_ids)
        if events is not None:
            events[1].record()
            self._pending_events.append(events)
        else:
            self.seconds += time.perf_counter() - started

    def _collect_event_times(self) -> None:
        """Add the CUDA time of the last step's observations (its events are done by now)."""
        for begin, end in self._pending_events:
            self.seconds += begin.elapsed_time(end) / 1000.0
        self._pending_events.clear()

    def _key_reader(self, layer, impl, kv_cache, key_dtype) -> kv_cache_keys.KeyReader | None:
        """The cache's layout, probed on first use; None (logged once) when it cannot be read."""
        if self._reader is None and self._unsupported is None:
            try:
                reader = kv_cache_keys.guess_reader(layer, impl)
                kv_cache_keys.probe(reader, layer, impl, kv_cache, key_dtype)
                self._reader = reader
            except kv_cache_keys.UnsupportedCache as exc:
                self._unsupported = str(exc)
                logger.warning("hippo: s_attn cannot read this KV cache (%s); draft views are built "
                               "without the target's attention", exc)
        return self._reader

    def _plan(self, device: torch.device) -> list[_Observation]:
        """The step's observations, the same for every layer (so worked out at the first)."""
        if self._step_plan is None:
            plan = []
            for req_id, (batch_index, row, start, n) in self._rows().items():
                state = self._requests[req_id]
                end = min(start + n, state.prompt_len)
                if end <= start:
                    continue
                for video in state.videos:
                    key_rows = max(0, min(video.offset + video.length, end) - max(video.offset, start))
                    wanted = video.query_positions
                    wanted = wanted[(wanted >= start) & (wanted < end)]
                    rows = (wanted + (row - start)).to(device) if len(wanted) else None
                    plan.append(_Observation(video, batch_index, key_rows, rows, len(wanted)))
            self._step_plan = plan
        return self._step_plan

    def _observe(self, layer_index, layer, impl, query, key, kv_cache, attn_metadata) -> None:
        num_heads, num_kv_heads, head_size = impl.num_heads, impl.num_kv_heads, impl.head_size
        queries = keys = None
        for obs in self._plan(query.device):
            video = obs.video
            if video.failed:
                continue  # an earlier error: incomplete for good
            seen = video.keys_observed[layer_index] = video.keys_observed.get(layer_index, 0) + obs.key_rows
            if obs.query_rows is None:
                continue
            reader = self._key_reader(layer, impl, kv_cache, key.dtype)
            if reader is None or seen < video.length:
                video.missing_keys = True  # keys this run did not compute, or an unreadable cache
                continue
            if queries is None:
                queries, keys = query.view(-1, num_heads, head_size), reader.key_view(kv_cache, head_size)
            sums = torch.zeros(video.length, dtype=torch.float32, device=query.device)
            video_key_colsum(
                kv_cache_keys.model_query(layer, queries[obs.query_rows], num_kv_heads), keys,
                reader.layout, attn_metadata.block_table[obs.batch_index], video.offset, video.length,
                impl.scale, sums, k_scale=reader.k_scale, fp8_format=reader.fp8_format)
            video.accumulator.add_layer_sums(sums, obs.num_queries * num_heads, layer=layer_index)
            video.queries_observed[layer_index] = video.queries_observed.get(layer_index, 0) + obs.num_queries
