"""The hippo model runner: vLLM's V1 runner plus the draft's per-step hooks.

Subclassing (not patching) keeps vLLM's own step intact: the target forward,
sampling, rejection sampling and bookkeeping run unchanged. The mixin only

- gives the proposer, once the target is loaded, the draft's backend of the
  configured placement (``placements.factory``; the proposer knows only the
  ``DraftBackend`` interface),
- tells the proposer about each step before the target forward (so the attention
  capture can map batch rows to requests, and finished or preempted requests
  release their draft state) and after it (under tensor parallelism the ranks
  sum their shares of s_attn there),
- routes vLLM's ``custom_class`` drafting call to ``HippoProposer.propose_batch``
  with the runner, which the stock call does not pass, and
- keeps the proposer's figures exported to process 0 (``stats_export``) until the
  runner shuts down, and
- allocates the draft's KV cache right after the target's, once vLLM has sized
  the target's cache from the memory the hippo worker left it
  (:func:`reserve_draft_kv_cache`).

Every call into the proposer is guarded: an exception is reported to
``HippoProposer.step_failed`` (the step's requests lose drafting for that step)
and never reaches vLLM's engine core, since speculation is optional for the
output. A step in which vLLM does not call the drafter at all (it skips it when
a request is near ``max_model_len``) is detected by the proposer when the next
step starts.
"""

from __future__ import annotations

import functools
import time
from typing import Any

from hippo_vllm.vllm.metrics.export import ensure_exporting, stop_exporting
from hippo_vllm.vllm.placements.factory import make_draft_backend
from hippo_vllm.vllm.target.proposer import HippoProposer
from hippo_vllm.vllm.target.step_records import (
    no_drafts,
    scheduled_req_ids,
    target_kv_bytes_per_token,
    target_kv_tokens,
)


class HippoRunnerMixin:
    """Mixed in front of GPUModelRunner or CPUModelRunner (V1)."""

    def _hippo(self) -> HippoProposer | None:
        drafter = getattr(self, "drafter", None)
        return drafter if isinstance(drafter, HippoProposer) else None

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        super().load_model(*args, **kwargs)  # vLLM calls the proposer's load_model in there
        proposer = self._hippo()
        if proposer is not None and proposer.runs_draft:
            proposer.attach_draft(make_draft_backend(
                self.vllm_config, proposer.hippo, proposer.stats, tensor_parallel_group=proposer.draft_group
            ))

    def execute_model(self, scheduler_output: Any, *args: Any, **kwargs: Any):
        proposer = self._hippo()
        if proposer is None:
            return super().execute_model(scheduler_output, *args, **kwargs)
        proposer.new_step()  # plain bookkeeping, cannot fail
        _guarded(proposer, "begin_step", scheduler_output, proposer.begin_step, self, scheduler_output)
        # VPSD sends the step's drafting work here; in the target's process it is
        # drafted now, before the target's forward, not beside it.
        _guarded(proposer, "parallel chunk drafting", scheduler_output,
                 proposer.launch_parallel_drafts, self, scheduler_output)
        start = time.perf_counter()
        try:
            output = super().execute_model(scheduler_output, *args, **kwargs)
            # Under TP a collective: every rank, same point of the step.
            _guarded(proposer, "after_target_forward", scheduler_output, proposer.after_target_forward)
            return output
        finally:
            proposer.stats.target_step_seconds += time.perf_counter() - start
            _guarded(proposer, "end_step", scheduler_output, proposer.end_step)

    def sample_tokens(self, *args: Any, **kwargs: Any):
        proposer = self._hippo()
        if proposer is None:
            return super().sample_tokens(*args, **kwargs)
        # Sampling belongs to the target's step; proposing (called inside it) is counted apart.
        start, self._hippo_proposing_seconds = time.perf_counter(), 0.0
        try:
            return super().sample_tokens(*args, **kwargs)
        finally:
            proposer.stats.target_step_seconds += time.perf_counter() - start - self._hippo_proposing_seconds

    def propose_draft_token_ids(self, scheduler_output: Any, sampled_token_ids: Any, *args: Any, **kwargs: Any):
        proposer = self._hippo()
        if proposer is None:
            return super().propose_draft_token_ids(scheduler_output, sampled_token_ids, *args, **kwargs)
        # vLLM asserts this before calling a custom_class proposer: the tokens each
        # request committed, as lists (async scheduling, refused with hippo, would
        # hand over device tensors).
        assert isinstance(sampled_token_ids, list), type(sampled_token_ids)
        start = time.perf_counter()
        try:
            ensure_exporting(proposer)  # hippo figures to process 0's logs and /metrics
            drafts = _guarded(proposer, "propose_batch", scheduler_output,
                              proposer.propose_batch, self, scheduler_output, sampled_token_ids)
            return drafts if drafts is not None else no_drafts(self)
        finally:
            self._hippo_proposing_seconds = getattr(self, "_hippo_proposing_seconds", 0.0) + (
                time.perf_counter() - start
            )

    def initialize_kv_cache(self, kv_cache_config: Any, is_profiling: bool = False, **kwargs: Any) -> None:
        super().initialize_kv_cache(kv_cache_config, is_profiling, **kwargs)
        proposer = self._hippo()
        if proposer is not None and not is_profiling:  # a profiling cache is a throwaway minimum
            proposer.allocate_draft_kv_cache(target_kv_tokens(kv_cache_config))

    def shutdown(self) -> None:
        proposer = self._hippo()
        stop_exporting(proposer)  # the stats snapshot goes with the engine
        if proposer is not None:
            proposer.close()  # a draft worker of its own goes with it too
        super().shutdown()


def _guarded(proposer: HippoProposer, where: str, scheduler_output: Any, call, *args: Any) -> Any:
    """``call(*args)``, or None after reporting its exception as a step-wide failure."""
    try:
        return call(*args)
    except Exception as exc:  # noqa: BLE001 - drafting must never stop the engine
        proposer.step_failed(where, exc, scheduled_req_ids(scheduler_output))
        return None


def reserve_draft_kv_cache(runner: Any, available_bytes: int) -> int:
    """The part of ``available_bytes`` (vLLM's KV memory) left for the target's KV cache.

    Called by the hippo workers' ``determine_available_memory``, so one memory
    budget (gpu_memory_utilization or kv_cache_memory_bytes) covers target and
    draft: the draft's KV cache and its working memory, measured by one dummy
    encode of the batch vLLM's own profiling encodes and one prefill piece. A
    runner without the draft gives up nothing; vLLM sizes every rank's cache by
    the smallest figure of all workers.
    """
    drafter = getattr(runner, "drafter", None)
    if not isinstance(drafter, HippoProposer):
        return available_bytes
    return available_bytes - drafter.reserve_draft_kv_cache(
        available_bytes, target_kv_bytes_per_token(runner), encoder_profile_batch(runner))


def encoder_profile_batch(runner: Any) -> dict[str, Any] | None:
    """Batched kwargs of the dummy items vLLM's profile run encodes at once, or None.

    vLLM profiles the target's vision encoder with ``mm_max_items_per_batch`` items of the
    largest size (``profile_run``: ``_get_mm_dummy_batch`` of the modality with the most
    tokens per item), as many as its encoder budget lets one step encode. The draft's
    tower reads the target's processor outputs, so it measures the same batch and then
    encodes a step's items together up to those rows, as the target's encoder does.
    """
    budget = getattr(runner, "mm_budget", None)
    mm_config = runner.model_config.multimodal_config
    if budget is None or not budget.mm_max_toks_per_item or (mm_config and mm_config.skip_mm_profiling):
        return None  # a text-only target, or multimodal profiling switched off by the user
    modality = budget.get_modality_with_max_tokens()
    return runner._get_mm_dummy_batch(modality, budget.mm_max_items_per_batch[modality])


@functools.cache
def hippo_runner_class(base: type) -> type:
    """``HippoRunnerMixin`` in front of ``base``, built once per base class."""
    return type(f"Hippo{base.__name__}", (HippoRunnerMixin, base), {"__module__": __name__})
