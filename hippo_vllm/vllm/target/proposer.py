"""HippoProposer: the target's side of drafting, for every request of a vLLM step.

vLLM builds this class through its ``custom_class`` seam (see config_rewrite), and
the hippo model runner drives it: ``begin_step`` before the target forward (track
requests whose prefill needs s_attn, release finished and preempted ones),
``launch_parallel_drafts`` right after it (VPSD only), ``after_target_forward``
after the target's forward, and ``propose_batch`` after sampling, with the tokens
each request committed. Under tensor parallelism every rank captures s_attn, but
only the output rank has a draft (see tensor_parallel).

The draft itself lives on the draft's side (``draft/worker.py``) behind a
``placements/backend.py`` backend; this side reads vLLM's step state only through
``step_records`` and talks to the draft only through ``protocol.py``: one
``StepWork`` per target step (queued releases, the prefills the step's chunks
need, the chunk orders; built by ``draft_messages``) and one ``StepResult``
back. Draft-then-verify sends and reads it in ``propose_batch``; VPSD sends it
before the target's forward and reads it after sampling (``schedules``, with its
restarts and adaptive length; ``parallel_rounds``). Either way the draft proposes greedily: a one-hot
proposal, which vLLM's rejection sampler verifies exactly for greedy and random
sampling alike. Where the draft runs is ``placements/factory.py``'s choice: in the
target's process (``InProcessDraft``, the default) drafting runs in sequence with
the target's forward; in a worker of its own VPSD drafts while the target
verifies, and a step whose answer is not back ``timeout_ms`` after sampling goes
on without chunks. In either schedule such a late answer is read when it comes,
for its news (views built, failures, prefills that found no room); only its
chunks are stale.

No exception leaves the proposer's entry points (the runner guards each call and
reports to :meth:`step_failed`; the failure paths are ``failure_handling``'s): a
failure while drafting one request (reported by the draft's side as a
``DraftFailure``) stops drafting for that request, one that cannot be attributed
costs every request of the step its drafting for that step (their draft state is
rebuilt next step from the kept view), and after
``drafting_failures.MAX_FAILED_STEPS_IN_A_ROW`` such steps drafting stops for the
engine. The target's outputs never depend on the draft.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable
from typing import Any

from hippo_vllm.core.adaptive_length import VerdictDeadline
from hippo_vllm.logs import get_logger
from hippo_vllm.vllm.target.attention_capture import TargetAttentionCapture
from hippo_vllm.config import hippo_settings
from hippo_vllm.vllm.placements.backend import DraftBackend, PendingStep
from hippo_vllm.vllm.target.draft_kv_budget import DraftKVBudget
from hippo_vllm.vllm.target.draft_messages import ChunkPlan, DraftMessages, SentStep
from hippo_vllm.vllm.target.failure_handling import FailureHandling
from hippo_vllm.vllm.target.first_drafts import FirstDrafts
from hippo_vllm.vllm.target.late_answers import LateAnswers
from hippo_vllm.vllm.protocol import DraftFailure, StepResult
from hippo_vllm.vllm.target.schedules import ParallelSchedule, SerialSchedule
from hippo_vllm.vllm.target.drafting_failures import DraftingFailures
from hippo_vllm.vllm.metrics.stats import HippoStats
from hippo_vllm.vllm.model_families import family_of
from hippo_vllm.vllm.target.step_records import (
    StartingPrompt,
    after_sampling,
    batch_rows,
    before_forward,
    draft_prompt,
    no_drafts,
    step_start,
)
from hippo_vllm.vllm.tensor_parallel import (
    is_output_rank,
    make_draft_group,
    make_sum_over_ranks,
    tensor_parallel_rank,
)

logger = get_logger(__name__)


class HippoProposer(FailureHandling):
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
        self.family = family_of(vllm_config.model_config.hf_config)  # checked when the config was rewritten
        self.draft: DraftBackend | None = None  # None: a TP rank whose drafts vLLM does not read
        self.draft_group = None  # the one-rank group the draft runs in (load_model)
        self.runs_draft = False  # whether this rank runs the draft (the output rank)
        self.capture: TargetAttentionCapture | None = None
        self.stats = HippoStats()
        self.failures = DraftingFailures(self.stats)
        # PEARL's adaptive length: the draft's side gets the time until the verdict is due.
        deadline = VerdictDeadline() if hippo.draft_length == "adaptive" else None
        self.schedule = (ParallelSchedule(self.num_speculative_tokens, self.stats, deadline)
                         if hippo.parallel else SerialSchedule())
        self.messages = DraftMessages()
        # Draft-then-verify drafts k tokens near max_tokens too when the target replays FULL
        # CUDA graphs, which serve only steps whose every request verifies 1+k tokens; the
        # rows this adds are few (docs/benchmarks.md, step shapes). VPSD's conservative
        # steps (no spec tokens after a rejection) are uneven by design: padding them would
        # add most of a step's rows, so VPSD does not pad.
        cudagraph_mode = vllm_config.compilation_config.cudagraph_mode
        self.pad_drafts_to_k = (not hippo.parallel and cudagraph_mode is not None
                                and cudagraph_mode.has_full_cudagraphs())
        # How long propose_batch waits for the work sent before the forward (None: until it is back).
        self.result_timeout: float | None = None
        self.encodes_on_arrival = False  # set by attach_draft
        self._pending: tuple[SentStep, PendingStep] | None = None  # sent before the forward, unread
        self._pending_sent_at = 0.0
        self.late = LateAnswers(self._take_in, self._forget_unanswered)  # not back in their step
        self._failed: set[str] = set()  # requests that lost drafting for good
        self._failed_this_step: set[str] = set()  # lost it for this step (a step-wide failure)
        self.disabled = False  # drafting stopped for the engine after repeated failures
        self.first_drafts = FirstDrafts(self.stats)

    # -- set-up --------------------------------------------------------------------------

    def load_model(self, target_model: Any) -> None:
        """Called by vLLM's runner after the target is loaded."""
        config = self.vllm_config
        hf_text = config.model_config.hf_text_config
        if self.hippo.uses_target_attention:
            layers = TargetAttentionCapture.find_text_attention_layers(
                config.compilation_config.static_forward_context
            )
            indices = self.hippo.resolve_attn_layers(hf_text.num_hidden_layers)
            self.capture = TargetAttentionCapture(
                layers, indices, sum_over_ranks=make_sum_over_ranks(), on_failure=self.capture_failed
            )
        # Under tensor parallelism the draft runs whole on the output rank only; the
        # group it runs in is created by every rank (a collective), before that split.
        self.draft_group = make_draft_group()
        self.runs_draft = is_output_rank()
        if not self.runs_draft:
            logger.info("hippo: tensor-parallel rank %d runs no draft", tensor_parallel_rank())

    def attach_draft(self, draft: DraftBackend) -> None:
        """The output rank's draft, in the placement the hippo runner chose (its KV not yet allocated).

        The draft's KV cache is allocated later (allocate_draft_kv_cache), from the
        memory the hippo worker sets aside for it.
        """
        self.draft = draft
        # A draft of its own answers within its deadline or its step goes without chunks.
        self.result_timeout = draft.result_timeout
        # ... and encodes a request's videos as it arrives, beside the target's prefill
        # (in the target's process that would only move the encode earlier in sequence).
        self.encodes_on_arrival = draft.result_timeout is not None
        if isinstance(self.schedule, ParallelSchedule):
            # ... and VPSD waits for a short chunk after a rejection rather than a step without drafts.
            self.schedule.restarts = draft.result_timeout is not None
        sched = self.vllm_config.scheduler_config
        self.kv_budget = DraftKVBudget(
            setting=self.hippo.draft_kv_tokens,
            keep_ratio=self.hippo.keep_ratio,
            # Every running request at full length, plus the k drafted tokens.
            max_useful_tokens=sched.max_num_seqs * (self.max_model_len + self.num_speculative_tokens + 1),
            draft_bytes_per_token=draft.kv_bytes_per_token,
            block_size=draft.block_size,
        )

    def close(self) -> None:
        """Stop the draft's backend (a worker of its own); never raises."""
        draft, self.draft = self.draft, None
        if draft is not None:
            try:
                draft.close()
            except Exception:  # noqa: BLE001 - shutting down; the worker also exits with this process
                logger.exception("hippo: closing the draft worker failed")

    def reserve_draft_kv_cache(self, available_bytes: int, target_bytes_per_token: float,
                               mm_batch: dict[str, Any] | None = None) -> int:
        """Bytes of vLLM's KV memory the draft needs (``DraftKVBudget.reserve_for``); 0 on a
        tensor-parallel rank without the draft (vLLM sizes every rank's cache by the
        smallest figure, the output rank's)."""
        if self.draft is None:
            return 0
        return self.kv_budget.reserve_for(self.draft, available_bytes, target_bytes_per_token, mm_batch)

    def allocate_draft_kv_cache(self, target_tokens: int) -> None:
        """Allocate the draft's KV cache once the target's holds ``target_tokens`` tokens."""
        if self.draft is not None:
            self.kv_budget.allocate_for(self.draft, target_tokens)

    def propose(self, *args: Any, **kwargs: Any) -> list[list[int]]:
        raise RuntimeError(
            "HippoProposer needs the hippo model runner (worker_cls "
            "hippo_vllm.vllm.seam.worker_cpu or worker_gpu); it was called by a stock runner."
        )

    # -- per step ------------------------------------------------------------------------

    def new_step(self) -> None:
        """A target step starts: step-wide failures of the last one expire."""
        self.first_drafts.new_step()
        self.failures.new_step()
        self._failed_this_step.clear()

    def begin_step(self, runner: Any, scheduler_output: Any) -> None:
        step = step_start(runner, scheduler_output)
        for req_id in step.finished:
            self.release(req_id, finished=True)
        for req_id in step.preempted:
            self.release(req_id, finished=False)
        if step.arriving and self.encodes_on_arrival and self.draft is not None and not self.disabled:
            # A draft of its own encodes arriving videos while the target prefills them;
            # the answer carries no chunks and is read when it comes.
            sent = self._send(None, [], arriving=step.arriving)
            if sent is not None:
                self.late.wait(*sent)
        # Under tensor parallelism the other ranks go on summing s_attn with this one
        # (a collective) after drafting stopped here, so the capture goes on too.
        if self.capture is None or (self.disabled and not self.capture.sums_over_ranks):
            return
        for prompt in step.starting:
            self._maybe_track(prompt)
        # Batch rows are mapped to requests at forward time, after vLLM ordered its batch.
        self.capture.begin_step(step, functools.partial(batch_rows, runner, scheduler_output))

    def after_target_forward(self) -> None:
        """Every rank, after the target's forward: sum the s_attn of ended prefills over TP ranks."""
        if self.capture is not None:
            self.capture.sum_ended_prefills()

    def end_step(self) -> None:
        if self.capture is not None:
            self.capture.end_step()
            self.stats.target_attention_seconds += self.capture.take_seconds()

    def _maybe_track(self, prompt: StartingPrompt) -> None:
        # Under tensor parallelism every rank must track the same requests (their
        # s_attn is summed over the ranks), and only the output rank has views.
        has_view = self.messages.has_view(prompt.req_id) and not self.capture.sums_over_ranks
        if has_view or prompt.prompt_len is None or self.capture.is_tracking(prompt.req_id):
            return
        if prompt.video_spans:
            self.capture.track(prompt.req_id, prompt.prompt_len, prompt.video_spans, prompt.mm_ranges)

    def release(self, req_id: str, finished: bool, keep_capture: bool = False) -> None:
        """Free the request's draft KV (with the next step's work); a finished request also loses its view."""
        self.messages.release(req_id, finished)
        self.schedule.release(req_id)
        if finished:
            self._failed.discard(req_id)
            self.first_drafts.forget(req_id)
        if self.capture is not None and not keep_capture:
            self.capture.drop(req_id)

    def launch_parallel_drafts(self, runner: Any, scheduler_output: Any) -> None:
        """VPSD: send this step's work before the target's forward (in-process: drafted now)."""
        if self.draft is None or self.disabled or not self.schedule.drafts_before_forward:
            return
        if self._pending is not None:  # vLLM ran the last step without the drafter
            self.late.wait(*self._pending)
            self._pending = None
        self.late.collect()
        records = before_forward(runner, scheduler_output, self.num_speculative_tokens, self.max_model_len)
        plans = self.schedule.plan_before_forward(records)
        self._pending = self._send(runner, plans, time_budget_s=self.schedule.time_budget_s())
        self._pending_sent_at = time.perf_counter()

    def propose_batch(
        self, runner: Any, scheduler_output: Any, sampled_token_ids: list[list[int]]
    ) -> list[list[int]]:
        """Next step's spec tokens for each request of the batch, in ``input_batch`` order."""
        drafts = no_drafts(runner)
        if self.draft is None or self.disabled:
            return drafts
        chunks = self._read_pending()  # the chunks drafted before the forward (VPSD)
        self.late.collect()  # before this step's chunks are planned: a late "no room" re-prefills
        records = after_sampling(
            runner, scheduler_output, sampled_token_ids, self.num_speculative_tokens, self.max_model_len,
            with_outputs=self.schedule.needs_outputs_after_sampling, pad_to_k=self.pad_drafts_to_k,
        )
        planned: list[tuple[int, ChunkPlan]] = []
        for record in records:
            req_id = record.req_id
            if not record.sampled or req_id in self._failed or req_id in self._failed_this_step:
                continue
            # Account this step's round first, also when it is the request's last.
            try:
                next_spec = self.schedule.follow(record, chunks.get(req_id))
            except Exception as exc:  # noqa: BLE001 - this request only
                self._request_failed(DraftFailure.from_exception(req_id, "parallel round", exc))
                continue
            if next_spec is not None and record.budget >= 0:
                # At 0 the next step commits one token without spec tokens; the
                # request stays so that step is accounted too.
                drafts[record.index] = next_spec[: record.budget]
                restart = self.schedule.restart_plan(record, next_spec, chunks.get(req_id))
                if restart is not None:
                    planned.append((record.index, restart))
                continue
            if record.budget <= 0:
                # The request ends within one more token: nothing to draft, and its
                # draft state can go now rather than when vLLM reports it finished.
                self.release(req_id, finished=False)
                continue
            try:
                drafts[record.index], plan = self.schedule.start(record)
            except Exception as exc:  # noqa: BLE001 - this request only
                self._request_failed(DraftFailure.from_exception(req_id, "parallel round", exc))
                continue
            if plan is not None:
                planned.append((record.index, plan))
        if planned or not self.schedule.drafts_before_forward:
            # Drafted now and waited for: draft-then-verify's chunks, VPSD's restarts.
            sent = self._send(runner, [plan for _, plan in planned])
            chunks = self._read(*sent, timeout=None) if sent is not None else {}
            for index, plan in planned:
                try:
                    drafts[index] = self.schedule.drafted(plan.req_id, chunks.get(plan.req_id, []))
                except Exception as exc:  # noqa: BLE001 - this request only
                    self._request_failed(DraftFailure.from_exception(plan.req_id, "parallel round", exc))
        self.schedule.finish_step()
        self.stats.record_drafts(sum(len(d) for d in drafts))
        self.first_drafts.note(records, drafts)
        return drafts

    # -- the draft's side ----------------------------------------------------------------

    def _send(self, runner: Any, plans: list[ChunkPlan], arriving: list[tuple[str, list]] = (),
              time_budget_s: float | None = None) -> tuple[SentStep, PendingStep] | None:
        """This step's work to the draft's side (None when there is nothing to send)."""
        self.messages.sync_epoch(self.draft.epoch)
        prompt_of = functools.partial(draft_prompt, runner, family=self.family)
        work = self.messages.work(plans, prompt_of, self._attention, arriving, time_budget_s)
        if not (work.releases or work.encodes or work.prefills or work.chunks):
            return None
        try:
            return SentStep.of(work), self.draft.submit(work)
        except Exception as exc:  # noqa: BLE001 - the work never reached the draft's side
            self.messages.requeue(work.releases)
            self.step_failed("draft submit", exc, SentStep.of(work).req_ids)
            return None

    def _attention(self, req_id: str) -> list | None:
        """The target's s_attn per video for the request's view (taken once)."""
        return self.capture.finish(req_id) if self.capture is not None else None

    def _read_pending(self) -> dict[str, list[int]]:
        pending, self._pending = self._pending, None
        if pending is None:
            return {}
        return self._read(*pending, timeout=self.result_timeout, sent_at=self._pending_sent_at)

    def _read(self, sent: SentStep, pending: PendingStep, timeout: float | None,
              sent_at: float | None = None) -> dict[str, list[int]]:
        """The step's chunks; its other news is taken in. A late result's chunks are dropped.
        ``sent_at``: when VPSD's work went (the schedule times the step)."""
        read_at = time.perf_counter()
        result = pending.result(timeout)
        if sent_at is not None and sent.chunks:
            self.schedule.answered(sent_at, read_at, time.perf_counter(), result)
        if result is None:
            self.late.wait(sent, pending)
            return {}
        return self._take_in(sent, result)

    def _forget_unanswered(self, req_ids: Iterable[str]) -> None:
        """A late answer that will never be read: what the draft's side holds of its
        requests is unknown, so their draft state is released and rebuilt from the kept view."""
        keep_capture = self._captures_agree_over_ranks()
        for req_id in req_ids:
            self.release(req_id, finished=False, keep_capture=keep_capture)

    def _take_in(self, sent: SentStep, result: StepResult) -> dict[str, list[int]]:
        if result.seq != sent.seq:
            raise RuntimeError(f"the draft answered step {result.seq} to step {sent.seq}")
        self.messages.received(sent, result)
        for report in result.views:
            self.stats.record_view(report)
        self.stats.draft_prefill_seconds += result.prefill_seconds
        self.stats.draft_encodes += result.encodes
        self.stats.draft_seconds += result.draft_seconds
        self.stats.draft_kv_full += len(result.no_room)  # drafting pauses; retried next step
        for failure in result.failures:
            self._request_failed(failure)
        if result.step_failure is not None:
            self._step_failed_with(result.step_failure, sent.req_ids)
            return {}
        return result.chunks

    # -- introspection (tests, metrics) ---------------------------------------------------

    @property
    def num_draft_requests(self) -> int:
        """Requests whose draft KV is prefilled, as far as the target's side knows."""
        return self.messages.num_prefilled

    @property
    def num_views(self) -> int:
        return self.messages.num_views
