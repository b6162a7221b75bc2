"""HippoProposer: drafts tokens for every request of a vLLM step.

vLLM builds this class through its ``custom_class`` seam (see config_rewrite), and
the hippo model runner drives it: ``begin_step`` before the target forward (track
requests whose prefill needs s_attn, release finished and preempted ones),
``launch_parallel_drafts`` right after it (VPSD only), ``after_target_forward``
after the target's forward, and ``propose_batch`` after sampling, with the tokens
each request committed. Under tensor parallelism every rank captures s_attn, but
only the output rank loads and runs the draft (see tensor_parallel). The draft
runs in the target's process, so all of this runs in sequence with the target's
forward.

Per request the draft keeps, in its own KV cache, the compact prompt (the draft
view) followed by output tokens (see chunk_drafting). Draft-then-verify drafts a
chunk after sampling; parallel mode drafts it before the target's forward and lets
parallel_rounds decide after sampling. Either way the draft proposes greedily: a
one-hot proposal, which vLLM's rejection sampler verifies exactly for greedy and
random sampling alike.

No exception leaves the proposer's entry points (the runner guards each call and
reports to :meth:`step_failed`): a failure while drafting one request stops
drafting for that request, one that cannot be attributed costs every request of
the step its drafting for that step (their draft state is rebuilt next step from
the kept view), and after ``MAX_FAILED_STEPS_IN_A_ROW`` such steps drafting stops
for the engine. The target's outputs never depend on the draft.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from typing import Any

import torch

from hippo_vllm.logs import get_logger
from hippo_vllm.vllm.attention_capture import TargetAttentionCapture
from hippo_vllm.vllm.chunk_drafting import ChunkDrafter, ChunkRequest, DraftState
from hippo_vllm.vllm.config_rewrite import hippo_settings
from hippo_vllm.vllm.draft_engine import DraftCapacityError, DraftEngine, DraftInput
from hippo_vllm.vllm.draft_kv_budget import DraftKVBudget
from hippo_vllm.vllm.drafting_failures import DraftingFailures
from hippo_vllm.vllm.draft_view import DraftView, needs_target_attention, video_spans
from hippo_vllm.vllm.metrics import HippoStats
from hippo_vllm.vllm.parallel_rounds import ParallelRounds
from hippo_vllm.vllm.request_views import RequestViews
from hippo_vllm.vllm.tensor_parallel import (
    is_output_rank,
    make_draft_group,
    make_sum_over_ranks,
    tensor_parallel_rank,
)

logger = get_logger(__name__)

MAX_FAILED_STEPS_IN_A_ROW = 3  # step-wide drafting failures before drafting stops for good


class HippoProposer:
    """The custom_class proposer object vLLM builds; driven by the hippo runner."""

    def __init__(self, vllm_config: Any):
        self.vllm_config = vllm_config
        hippo = hippo_settings(vllm_config)
        if hippo is None:
            raise RuntimeError(
                "HippoProposer is configured through "
                '--speculative-config \'{"method": "hippo", ...}\'; it cannot be used as a '
                "plain custom_class proposer."
            )
        self.hippo = hippo
        self.num_speculative_tokens = hippo.num_speculative_tokens
        self.max_model_len = vllm_config.model_config.max_model_len
        self.engine: DraftEngine | None = None
        self.rounds: ParallelRounds | None = None
        self.capture: TargetAttentionCapture | None = None
        self.stats = HippoStats()
        self.failures = DraftingFailures(self.stats)
        self._requests: dict[str, DraftState] = {}
        self._views: RequestViews | None = None  # survive preemption, freed on finish
        self._failed: set[str] = set()  # requests that lost drafting for good
        self._failed_this_step: set[str] = set()  # lost it for this step (a step-wide failure)
        self._failed_steps_in_a_row = 0
        self._step_failed = False
        self.disabled = False  # drafting stopped for the engine after repeated failures

    # -- set-up --------------------------------------------------------------------------

    def load_model(self, target_model: Any) -> None:
        """Called by vLLM's runner after the target is loaded."""
        config = self.vllm_config
        hf_text = config.model_config.hf_text_config
        self._views = RequestViews(
            self.hippo, config.model_config.hf_config.vision_config.spatial_merge_size, self.stats
        )
        if needs_target_attention(self.hippo):
            layers = TargetAttentionCapture.find_text_attention_layers(
                config.compilation_config.static_forward_context
            )
            indices = self.hippo.resolve_attn_layers(hf_text.num_hidden_layers)
            self.capture = TargetAttentionCapture(
                layers, indices, sum_over_ranks=make_sum_over_ranks(), on_failure=self.capture_failed
            )
        # Under tensor parallelism the draft runs whole on the output rank only; the
        # group it runs in is created by every rank (a collective), before that split.
        draft_group = make_draft_group()
        if not is_output_rank():
            logger.info("hippo: tensor-parallel rank %d runs no draft", tensor_parallel_rank())
            return
        # The draft's KV cache is allocated later (allocate_draft_kv_cache), from the
        # memory the hippo worker sets aside for it.
        self.engine = DraftEngine(config, self.hippo.model, tensor_parallel_group=draft_group)
        sched = config.scheduler_config
        self.kv_budget = DraftKVBudget(
            setting=self.hippo.draft_kv_tokens,
            keep_ratio=self.hippo.keep_ratio,
            # Every running request at full length, plus the k drafted tokens.
            max_useful_tokens=sched.max_num_seqs * (self.max_model_len + self.num_speculative_tokens + 1),
            draft_bytes_per_token=self.engine.kv_bytes_per_token,
            block_size=self.engine.block_size,
        )
        # The compact prefill runs in pieces no larger than the target's own batches.
        self.prefill_chunk_tokens = sched.max_num_batched_tokens
        self.chunks = ChunkDrafter(self.engine)
        self.rounds = (
            ParallelRounds(
                self.num_speculative_tokens, self.chunks, self.stats, self.max_model_len,
                on_failure=self._request_failed,
            )
            if self.hippo.parallel
            else None
        )
        logger.info(
            "hippo: draft %s loaded (keep_ratio=%s, pruning=%s, k=%d)",
            self.hippo.model, self.hippo.keep_ratio, self.hippo.pruning, self.num_speculative_tokens,
        )

    def reserve_draft_kv_cache(self, available_bytes: int, target_bytes_per_token: float) -> int:
        """Bytes of vLLM's KV memory the draft's cache needs (the target gets the rest).

        0 on a tensor-parallel rank without the draft; vLLM sizes every rank's
        cache by the smallest figure, the output rank's.
        """
        if self.engine is None:
            return 0
        return self.kv_budget.reserve_bytes(available_bytes, target_bytes_per_token)

    def allocate_draft_kv_cache(self, target_tokens: int) -> None:
        """Allocate the draft's KV cache once the target's holds ``target_tokens`` tokens."""
        if self.engine is None:
            return
        num_blocks = self.kv_budget.num_blocks(target_tokens)
        self.engine.allocate_kv_cache(num_blocks)
        logger.info(
            "hippo: draft KV cache of %d tokens (%.3f GiB, draft_kv_tokens=%s) next to the "
            "target's %d tokens",
            num_blocks * self.engine.block_size, self.engine.kv.num_bytes / 2**30,
            self.hippo.draft_kv_tokens, target_tokens,
        )

    def propose(self, *args: Any, **kwargs: Any) -> list[list[int]]:
        raise RuntimeError(
            "HippoProposer needs the hippo model runner (worker_cls "
            "hippo_vllm.vllm.worker_cpu or worker_gpu); it was called by a stock runner."
        )

    # -- per step ------------------------------------------------------------------------

    def new_step(self) -> None:
        """A target step starts: step-wide failures of the last one expire."""
        if not self._step_failed:
            self._failed_steps_in_a_row = 0
        self._step_failed = False
        self._failed_this_step.clear()

    def begin_step(self, runner: Any, scheduler_output: Any) -> None:
        for req_id in scheduler_output.finished_req_ids:
            self.release(req_id, finished=True)
        for req_id in getattr(scheduler_output, "preempted_req_ids", None) or ():
            self.release(req_id, finished=False)
        if self.capture is None or self.disabled:
            return
        # The runner adds new requests to runner.requests only inside execute_model,
        # so they are read from the scheduler output; resumed ones are still there.
        for new_req in scheduler_output.scheduled_new_reqs:
            self._maybe_track(new_req.req_id, new_req.prompt_token_ids, new_req.mm_features)
        for req_id in scheduler_output.scheduled_cached_reqs.resumed_req_ids:
            state = runner.requests.get(req_id)
            if state is not None:
                self._maybe_track(req_id, state.prompt_token_ids, state.mm_features)
        self.capture.begin_step(runner, scheduler_output)

    def after_target_forward(self) -> None:
        """Every rank, after the target's forward: sum the s_attn of ended prefills over TP ranks."""
        if self.capture is not None:
            self.capture.sum_ended_prefills()

    def end_step(self) -> None:
        if self.capture is not None:
            self.capture.end_step()

    def _maybe_track(self, req_id: str, prompt_token_ids: Any, mm_features: list[Any]) -> None:
        # Under tensor parallelism every rank must track the same requests (their
        # s_attn is summed over the ranks), and only the output rank has views.
        has_view = req_id in self._views and not self.capture.sums_over_ranks
        if has_view or prompt_token_ids is None or self.capture.is_tracking(req_id):
            return
        spans = video_spans(mm_features)
        if spans:
            ranges = [(f.mm_position.offset, f.mm_position.length) for f in mm_features]
            self.capture.track(req_id, len(prompt_token_ids), spans, ranges)

    def release(self, req_id: str, finished: bool, keep_capture: bool = False) -> None:
        """Free the request's draft KV; a finished request also loses its view."""
        if self.engine is not None:
            self.engine.free(req_id)
        self._requests.pop(req_id, None)
        if self.rounds is not None:
            self.rounds.release(req_id)
        if finished:
            self._views.drop(req_id)
            self._failed.discard(req_id)
        if self.capture is not None and not keep_capture:
            self.capture.drop(req_id)

    def launch_parallel_drafts(self, runner: Any, scheduler_output: Any) -> None:
        """VPSD: draft this step's chunks, before the target's forward (in sequence with it)."""
        if self.rounds is None or self.disabled:
            return
        start = time.perf_counter()
        self.rounds.launch(runner, scheduler_output, self._requests)
        self.stats.draft_seconds += time.perf_counter() - start

    # -- failures ------------------------------------------------------------------------

    def _request_failed(self, req_id: str, exc: BaseException, where: str) -> None:
        """Drafting failed for one request: it goes on without speculation."""
        self.failures.record(where, exc, [req_id])
        self._failed.add(req_id)
        with contextlib.suppress(Exception):
            self.release(req_id, finished=False, keep_capture=self._captures_agree_over_ranks())

    def step_failed(self, where: str, exc: BaseException, req_ids: Iterable[str]) -> None:
        """An error no single request can be blamed for; never raises.

        Every request of the step loses drafting for this step: its draft state
        and round are released (rebuilt next step from the kept view, so the
        output only loses speculation). After ``MAX_FAILED_STEPS_IN_A_ROW`` steps
        with such a failure, drafting stops for the engine.
        """
        try:
            req_ids = list(req_ids)
            self.failures.record(where, exc, req_ids)
            self._failed_this_step.update(req_ids)
            keep_capture = self._captures_agree_over_ranks()
            for req_id in req_ids:
                with contextlib.suppress(Exception):
                    self.release(req_id, finished=False, keep_capture=keep_capture)
            if not self._step_failed:
                self._step_failed = True
                self._failed_steps_in_a_row += 1
            if self._failed_steps_in_a_row >= MAX_FAILED_STEPS_IN_A_ROW:
                self.disable()
        except Exception:  # noqa: BLE001 - the last line of defence
            self.disable()

    def _captures_agree_over_ranks(self) -> bool:
        """Under tensor parallelism every rank must track the same requests, so a
        failure seen by one rank must not drop a capture (vLLM's finish and
        preemption, seen by all ranks, still do)."""
        return self.capture is not None and self.capture.sums_over_ranks

    def capture_failed(self, where: str, exc: BaseException, req_ids: Iterable[str]) -> None:
        """The attention capture failed inside the target's forward (it never raises there).

        The capture marked those requests' videos incomplete, so their views are
        built without s_attn; drafting itself goes on, and the captures are kept
        (under tensor parallelism every rank must go on tracking the same requests).
        """
        with contextlib.suppress(Exception):
            self.failures.record(where, exc, req_ids)

    def disable(self) -> None:
        """Stop drafting for the engine: free every draft state; no more spec tokens."""
        if self.disabled:
            return
        self.disabled = True
        logger.error(
            "hippo: drafting failed in %d steps in a row; speculation is off for this engine "
            "from now on (outputs are unaffected)", self._failed_steps_in_a_row,
        )
        for req_id in list(self._requests):
            with contextlib.suppress(Exception):
                self.release(req_id, finished=False)
        if self.capture is not None:
            with contextlib.suppress(Exception):
                self.capture.end_step()

    def propose_batch(
        self, runner: Any, scheduler_output: Any, sampled_token_ids: list[list[int]]
    ) -> list[list[int]]:
        """Next step's spec tokens for each request of the batch, in ``input_batch`` order."""
        batch = runner.input_batch
        drafts: list[list[int]] = [[] for _ in batch.req_ids]
        if self.engine is None or self.disabled:  # engine None: a TP rank whose drafts vLLM does not read
            return drafts
        active: list[tuple[int, str, int]] = []  # (batch index, req id, draft budget)
        spec_tokens = scheduler_output.scheduled_spec_decode_tokens
        for i, req_id in enumerate(batch.req_ids):
            if not sampled_token_ids[i] or req_id in self._failed or req_id in self._failed_this_step:
                continue
            budget = self._draft_budget(runner, i, req_id)
            # A request has rounds exactly while it has draft state (start/release).
            if self.rounds is not None and self.rounds.has(req_id):
                # Account this step's round first, also when it is the request's last.
                spec = list(spec_tokens.get(req_id, ()))
                start = time.perf_counter()  # waiting for the chunk counts as drafting
                try:
                    next_spec = self.rounds.resolve(req_id, spec, list(sampled_token_ids[i]))
                except Exception as exc:  # noqa: BLE001 - this request only
                    self._request_failed(req_id, exc, "parallel round")
                    continue
                finally:
                    self.stats.draft_seconds += time.perf_counter() - start
                if budget >= 0:
                    # At 0 the next step commits one token without spec tokens; the
                    # request stays so that step is accounted too.
                    drafts[i] = next_spec[:budget]
                    continue
            if budget <= 0:
                # The request ends within one more token: nothing to draft, and its
                # draft state can go now rather than when vLLM reports it finished.
                self.release(req_id, finished=False)
                continue
            try:
                start = time.perf_counter()
                self._ensure_prefilled(runner, req_id)
                self.stats.draft_prefill_seconds += time.perf_counter() - start
            except DraftCapacityError:
                self.stats.draft_kv_full += 1  # drafting pauses; retried next step
                continue
            except Exception as exc:  # noqa: BLE001 - this request only
                self._request_failed(req_id, exc, "draft prefill")
                continue
            if self.rounds is not None:
                # First step of a (re)started request: conservative, the draft's
                # first chunk is launched with the next target step.
                try:
                    drafts[i] = self.rounds.start(req_id, list(sampled_token_ids[i]))
                except Exception as exc:  # noqa: BLE001 - this request only
                    self._request_failed(req_id, exc, "parallel round")
            else:
                active.append((i, req_id, budget))
        if self.rounds is not None:
            self.rounds.finish_step()
            self.stats.record_drafts(sum(len(d) for d in drafts))
        elif active:
            start = time.perf_counter()
            self._draft(runner, active, drafts)
            self.stats.draft_seconds += time.perf_counter() - start
        return drafts

    # -- internals -----------------------------------------------------------------------

    def _draft_budget(self, runner: Any, index: int, req_id: str) -> int:
        """Tokens worth drafting: beyond max_tokens or max_model_len they are discarded."""
        num_tokens = int(runner.input_batch.num_tokens_no_spec[index])
        budget = min(self.num_speculative_tokens, self.max_model_len - num_tokens)
        params = runner.requests[req_id].sampling_params
        if params is not None and params.max_tokens is not None:
            produced = len(runner.requests[req_id].output_token_ids)
            # A step commits the accepted drafts plus one token of the target's own.
            budget = min(budget, params.max_tokens - produced - 1)
        return budget

    def _ensure_prefilled(self, runner: Any, req_id: str) -> None:
        if req_id in self._requests:
            return
        state = runner.requests[req_id]
        engine = self.engine
        prompt = torch.tensor(state.prompt_token_ids, dtype=torch.long)
        view = self._views.get(req_id)
        engine.free(req_id)
        if view is not None:
            self._check_room(req_id, view)  # before encoding the video again
        if state.mm_features:
            item_embeds = engine.embed_multimodal(state.mm_features)
        else:
            item_embeds = []
        if view is None:
            attention = self.capture.finish(req_id) if self.capture is not None else None
            view = self._views.build(req_id, state, item_embeds, attention)
        embeds = engine.embed_prompt(prompt, state.mm_features, item_embeds)[view.keep_rows]
        positions = self._prompt_positions(state, len(prompt))[:, view.keep_rows]
        self._check_room(req_id, view)
        # In pieces of at most max_num_batched_tokens rows, like the target's own
        # prefill: bounded activations, and the sizes a compiled model accepts.
        step = self.prefill_chunk_tokens
        try:
            for start in range(0, view.compact_len, step):
                rows = slice(start, start + step)
                engine.run([DraftInput(req_id, positions[:, rows], inputs_embeds=embeds[rows])])
        except BaseException:
            engine.free(req_id)  # no half-prefilled draft sequence stays behind
            raise
        self._requests[req_id] = DraftState(view, self._mrope_delta(state))

    def _check_room(self, req_id: str, view: DraftView) -> None:
        if not self.engine.has_room_for(view.compact_len):
            raise DraftCapacityError(
                f"no room for the {view.compact_len}-token draft prompt of request {req_id!r} "
                f"in the draft KV cache ({self.engine.num_free_blocks} blocks free)"
            )

    @staticmethod
    def _prompt_positions(state: Any, prompt_len: int) -> torch.Tensor:
        if state.mrope_positions is not None:
            return state.mrope_positions[:, :prompt_len].to(torch.long)
        return torch.arange(prompt_len).expand(3, -1)

    @staticmethod
    def _mrope_delta(state: Any) -> int:
        return int(state.mrope_position_delta or 0)

    def _draft(self, runner: Any, active: list[tuple[int, str, int]], drafts: list[list[int]]) -> None:
        batch = runner.input_batch
        requests = []
        for i, req_id, budget in active:
            state = self._requests[req_id]
            n_tokens = int(batch.num_tokens_no_spec[i])
            outputs = batch.token_ids_cpu[i, state.view.prompt_len : n_tokens].tolist()
            requests.append(ChunkRequest(req_id, state, outputs, budget))
        try:
            found, failures = self.chunks.launch_each(requests)
        except DraftCapacityError:
            self.stats.draft_kv_full += len(requests)  # drafting pauses this step
            return
        for (i, _, _), chunk in zip(active, found):
            if chunk is not None:
                pending, row = chunk
                drafts[i] = pending.tokens()[row]
        for request, exc in failures:
            self._request_failed(request.req_id, exc, "chunk drafting")
        self.stats.draft_kv_full += found.count(None) - len(failures)  # drafted alone, out of room
        self.stats.record_drafts(sum(len(d) for d in drafts))

    # -- introspection (tests, metrics) ---------------------------------------------------

    @property
    def num_draft_requests(self) -> int:
        return len(self._requests)

    @property
    def num_views(self) -> int:
        return len(self._views) if self._views is not None else 0
