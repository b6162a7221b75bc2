"""The draft's side of drafting: the draft model, its KV cache, its views.

A :class:`DraftWorker` answers one :class:`~hippo_vllm.vllm.protocol.StepWork`
per target step with one :class:`~hippo_vllm.vllm.protocol.StepResult`
(``handle``). It owns everything the draft needs and nothing of the target's
runner, so it can run in the target's process (``placements.in_process``)
or in a process of its own with only the pickled target ``VllmConfig``:

- the :class:`~hippo_vllm.vllm.draft.engine.DraftEngine` and its chunk drafting;
- each request's :class:`~hippo_vllm.vllm.protocol.DraftPrompt`, held from
  its first prefill until a finished ``Release``, so a preempted request is
  prefilled again without the target sending its video again;
- the draft views (``request_views``), which survive preemption, and the recent
  ones reused for prompts served from the target's prefix cache;
- the draft encoder's recent outputs by item (``recent_encodes``), so a video is
  encoded once while it is asked about, as vLLM's encoder cache does for the target;
- per request its draft state and the mirror of its last chunk order's outputs,
  to which each ``ChunkOrder``'s ``kept``/``new_tokens`` delta applies. A
  ``Release`` drops the mirror; the target's side drops its copy with it.

``handle`` never raises. An error that one request is to blame for (its prefill,
its chunk order, its chunk; a batched chunk that fails is drafted request by
request to find the culprit) becomes a ``DraftFailure`` for that request; lack of
draft KV puts the request in ``no_room`` (drafting pauses for it); anything else
becomes the step's ``step_failure``.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import torch

from hippo_vllm.config import HippoConfig
from hippo_vllm.core.adaptive_length import ChunkLength
from hippo_vllm.logs import get_logger
from hippo_vllm.vllm.draft.chunk_drafting import ChunkDrafter, ChunkRequest, DraftState
from hippo_vllm.vllm.draft.engine import DraftCapacityError, DraftEngine, DraftInput
from hippo_vllm.vllm.draft.prefills import DraftPrefills
from hippo_vllm.vllm.protocol import ChunkOrder, DraftFailure, DraftPrompt, Release, StepResult, StepWork
from hippo_vllm.vllm.model_families import architecture_of, family_of, supported_architectures
from hippo_vllm.vllm.draft.recent_encodes import RecentEncodes
from hippo_vllm.vllm.draft.request_views import RequestViews

logger = get_logger(__name__)


class DraftWorker(DraftPrefills):
    """Drafts for the target's steps; see the module docstring (prefills: ``draft.prefills``)."""

    def __init__(self, target_vllm_config: Any, hippo: HippoConfig, tensor_parallel_group=None,
                 decode_graphs: bool = False):
        self.hippo = hippo
        # A worker of its own captures its decode steps as CUDA graphs (decode_graphs), for
        # batches up to the target's: never more requests than the target runs at once.
        self.decode_graphs = decode_graphs
        self.max_decode_batch = target_vllm_config.scheduler_config.max_num_seqs
        # The draft's KV cache is allocated later (allocate_kv_cache), once its size is known.
        self.engine = DraftEngine(target_vllm_config, hippo.model, tensor_parallel_group=tensor_parallel_group)
        self.chunks = ChunkDrafter(self.engine)
        # The mm features come from the target's processor, so its family's layout applies.
        target_hf = target_vllm_config.model_config.hf_config
        family = family_of(target_hf)
        if family is None:
            raise ValueError(
                f"target {target_vllm_config.model_config.model} ({architecture_of(target_hf)}) is of no "
                f"model family hippo supports; supported architectures: {supported_architectures()}"
            )
        self.views = RequestViews(
            hippo, functools.partial(family.video_grid, hf_config=target_hf), family.video_newlines
        )
        # The compact prefill runs in pieces no larger than the target's own batches.
        self.prefill_chunk_tokens = target_vllm_config.scheduler_config.max_num_batched_tokens
        self._prompts: dict[str, DraftPrompt] = {}  # until a finished Release
        self._states: dict[str, DraftState] = {}  # requests with a prefilled draft KV
        self._orders: dict[str, list[int]] = {}  # each request's last chunk order's outputs
        self._encoded: dict[str, list[torch.Tensor]] = {}  # items encoded on arrival, until the prefill
        self.recent_encodes = RecentEncodes()
        self.chunk_length = ChunkLength()  # PEARL's adaptive length: tokens that fit in the step's time
        logger.info(
            "hippo: draft %s loaded (keep_ratio=%s, pruning=%s, k=%d)",
            hippo.model, hippo.keep_ratio, hippo.pruning, hippo.num_speculative_tokens,
        )

    # -- memory --------------------------------------------------------------------------

    @property
    def kv_bytes_per_token(self) -> float:
        return self.engine.kv_bytes_per_token

    @property
    def block_size(self) -> int:
        return self.engine.block_size

    def measure_headroom(self, mm_batch: dict[str, Any] | None = None) -> int:
        """Device bytes the draft's largest step needs beyond weights and KV cache:
        one encode of the profiling batch and one prefill piece (see ``DraftEngine.measure_headroom``)."""
        return self.engine.measure_headroom(self.headroom_tokens, mm_batch)

    @property
    def headroom_tokens(self) -> int:
        """Rows of the draft's largest prefill piece: no prompt is longer than max_model_len."""
        return min(self.prefill_chunk_tokens, self.engine.draft_vllm_config.model_config.max_model_len)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.engine.allocate_kv_cache(num_blocks)
        self._warm_up()
        if self.decode_graphs and self.engine.device.type == "cuda":
            start = time.perf_counter()
            try:
                self.engine.capture_decode_graphs(self.max_decode_batch)
            except Exception:  # noqa: BLE001 - the draft stays usable, eagerly
                self.engine.decode_graphs = None
                logger.exception("hippo: capturing the draft's decode CUDA graphs failed; it runs eagerly")
            else:
                logger.info("hippo: draft decode graphs captured in %.2f s", time.perf_counter() - start)

    WARM_UP_TOKENS = 8

    def _warm_up(self) -> None:
        """A tiny prefill and one decode step through the draft, before any request.

        The first forward of a model pays one-off costs (kernel compilation and
        autotuning, lazy allocations) that would otherwise land on the first
        request's step. Text rows only: the vision encoder warms on the first video.
        """
        engine, n = self.engine, self.WARM_UP_TOKENS
        if not engine.has_room_for(n + 1):
            return  # a cache too small to spare even this: the first request warms it
        req_id = "hippo-warm-up"
        ids = torch.arange(n, dtype=torch.long) % engine.proposable_ids
        positions = torch.arange(n + 1, dtype=torch.long).expand(3, -1)
        start = time.perf_counter()
        try:
            engine.run([DraftInput(req_id, positions[:, :n].clone(), token_ids=ids)])
            engine.run([DraftInput(req_id, positions[:, n:].clone(), token_ids=ids[:1])])
        finally:
            engine.free(req_id)
        logger.info("hippo: draft warmed up in %.2f s", time.perf_counter() - start)

    # -- one step ------------------------------------------------------------------------

    def handle(self, work: StepWork) -> StepResult:
        """Releases, then early encodes, prefills and chunks; never raises (see the module docstring)."""
        result = StepResult(work.seq)
        received = time.perf_counter()
        try:
            for release in work.releases:
                self._release(release)
            start = time.perf_counter()
            if work.encodes:  # on arrival
                self._encode_together([(e.req_id, e.mm_features) for e in work.encodes], result)
            if work.prefills:  # most steps only draft
                self._prefill_all(work.prefills, result)
            result.prefill_seconds = time.perf_counter() - start
            start = time.perf_counter()
            length = self._draft(work.chunks, result, work.time_budget_s, elapsed_s=start - received)
            result.draft_seconds = time.perf_counter() - start
            self.chunk_length.observe(result.draft_seconds, length)
        except Exception as exc:  # noqa: BLE001 - no request to blame; the target's side decides
            result.step_failure = DraftFailure.from_exception("", "draft step", exc)
        return result

    def _release(self, release: Release) -> None:
        self.engine.free(release.req_id)
        self._states.pop(release.req_id, None)
        self._orders.pop(release.req_id, None)
        if release.finished:  # a preempted request keeps what it was encoded to on arrival
            self._encoded.pop(release.req_id, None)
            self._prompts.pop(release.req_id, None)
            self.views.drop(release.req_id)

    def _draft(self, orders: list[ChunkOrder], result: StepResult, time_budget_s: float | None,
               elapsed_s: float) -> int:
        """Draft the orders' chunks (at most as many tokens as fit in ``time_budget_s``,
        ``elapsed_s`` into the step); the longest chunk's length (0: none drafted)."""
        paused = set(result.no_room) | {f.req_id for f in result.failures}
        requests = []
        for order in orders:
            try:
                outputs = self._apply_order(order)
                state = self._states.get(order.req_id)
                if state is None and order.req_id not in paused:
                    raise RuntimeError(
                        f"chunk order for request {order.req_id!r}, which has no draft state "
                        "(it was never prefilled, or was released)"
                    )
                if order.budget < 1:
                    raise ValueError(f"chunk order for request {order.req_id!r}: budget {order.budget} < 1")
            except Exception as exc:  # noqa: BLE001 - this request only
                result.failures.append(DraftFailure.from_exception(order.req_id, "chunk drafting", exc))
                continue
            if state is not None:  # else its prefill found no room or failed this step
                requests.append(ChunkRequest(order.req_id, state, outputs, order.budget))
        if not requests:
            return 0
        length = self.chunk_length.tokens(max(r.budget for r in requests), time_budget_s, elapsed_s)
        for r in requests:
            r.budget = min(r.budget, length)
        try:
            found, failures = self.chunks.launch_each(requests)
        except DraftCapacityError:
            result.no_room.extend(r.req_id for r in requests)  # drafting pauses this step
            return 0
        for request, chunk in zip(requests, found):
            if chunk is not None:
                pending, row = chunk
                result.chunks[request.req_id] = pending.tokens()[row]
        failed = set()
        for request, exc in failures:
            failed.add(request.req_id)
            result.failures.append(DraftFailure.from_exception(request.req_id, "chunk drafting", exc))
        # Drafted alone, out of room.
        result.no_room.extend(
            r.req_id for r, chunk in zip(requests, found) if chunk is None and r.req_id not in failed
        )
        return max((len(tokens) for tokens in result.chunks.values()), default=0)

    def _apply_order(self, order: ChunkOrder) -> list[int]:
        """The order's outputs: ``kept`` tokens of the last order's, then its new ones."""
        previous = self._orders.get(order.req_id, [])
        if not 0 <= order.kept <= len(previous):
            raise ValueError(
                f"chunk order for request {order.req_id!r} keeps {order.kept} tokens of its last "
                f"order, which had {len(previous)}"
            )
        outputs = previous[: order.kept] + list(order.new_tokens)
        self._orders[order.req_id] = outputs
        return list(outputs)

    # -- introspection (tests) -----------------------------------------------------------

    @property
    def num_draft_requests(self) -> int:
        return len(self._states)

    @property
    def num_views(self) -> int:
        return len(self.views)

    @property
    def num_prompts(self) -> int:
        return len(self._prompts)
