"""``bench_e2e``'s per-step instrument: what each engine step scheduled, drafted, accepted and cost.

Imported by ``bench_e2e.py``; wraps methods on one ``LLM``'s instances (never on vLLM's
classes), so every row is measured the same way and vLLM itself is unchanged.
"""

from __future__ import annotations

import time

_NOT_OWN = object()


class StepTracker:
    """Per-step counts and times of one engine, taken the same way for every row.

    The scheduler's ``update_from_output`` sees, for every engine step, the spec
    tokens each request had scheduled and the tokens it sampled, whatever drafted
    them; the runner's ``execute_model``/``sample_tokens`` bracket all work in the
    worker. Both are wrapped on the instances, so vLLM itself is unchanged.
    """

    def __init__(self, llm, max_tokens: int, worker: bool, stop_ids: frozenset[int] = frozenset()):
        self.max_tokens = max_tokens
        self.stop_ids = stop_ids  # a request's output ends at the first of these (none with ignore_eos)
        self.worker = worker
        engine = llm.llm_engine
        self.runner = engine.model_executor.driver_worker.worker.model_runner
        drafter = getattr(self.runner, "drafter", None)
        self.hippo = getattr(drafter, "stats", None)  # HippoStats, on hippo engines only
        self._wrapped: list[tuple[object, str, object]] = []
        self._wrap(engine.engine_core.engine_core.scheduler, "update_from_output", before=self._count)
        self._wrap_engine_step(engine)
        self._wrap(self.runner, "execute_model", before=lambda *_: self._next_step(), timer="runner_seconds")
        self._wrap(self.runner, "sample_tokens", timer="runner_seconds")
        if drafter is not None and self.hippo is None:
            self._wrap(drafter, "propose", timer="drafter_seconds")
        # The models' own forwards and vision encoders, wherever they run in this process:
        # the target's, draft_model's draft, hippo's in-process draft.
        models = [self.runner.model, getattr(drafter, "model", None),
                  getattr(getattr(getattr(getattr(drafter, "draft", None), "worker", None), "engine", None),
                          "model", None)]
        for model in (m for m in models if m is not None):
            for name in ("forward", "embed_multimodal"):
                if hasattr(model, name):
                    self._wrap(model, name, timer="forward_seconds", outermost=True)
        self._in_forward = False
        self._step_mark: tuple[float, float] | None = None
        self.counts: dict[str, float] = {}
        self.reset()

    def _wrap(self, owner, name: str, before=None, timer: str | None = None, outermost: bool = False) -> None:
        """``outermost``: time only calls not already inside another wrapped call of the kind."""
        method = getattr(owner, name)

        def wrapper(*args, **kwargs):
            if before is not None:
                before(*args)
            if outermost and self._in_forward:
                return method(*args, **kwargs)
            start = time.perf_counter()
            self._in_forward = self._in_forward or outermost
            try:
                return method(*args, **kwargs)
            finally:
                if outermost:
                    self._in_forward = False
                if timer is not None:
                    self.counts[timer] += time.perf_counter() - start

        own = vars(owner).get(name, _NOT_OWN)  # an instance attribute to put back, if there was one
        setattr(owner, name, wrapper)
        self._wrapped.append((owner, name, own))

    def _wrap_engine_step(self, engine) -> None:
        """Each engine step's host time: its wall time minus the forwards in it (and, with a
        worker, the wait for the draft), kept per step with whether the step prefilled."""
        step = engine.step

        def timed_step(*args, **kwargs):
            self._step_prefills = False
            forwards, waited, start = self.counts["forward_seconds"], self._waited(), time.perf_counter()
            try:
                return step(*args, **kwargs)
            finally:
                host = (time.perf_counter() - start - (self.counts["forward_seconds"] - forwards)
                        - (self._waited() - waited))
                if self._step_ran:
                    self.step_hosts.append((self._step_prefills, host))
                self._step_ran = False

        own = vars(engine).get("step", _NOT_OWN)
        engine.step = timed_step
        self._wrapped.append((engine, "step", own))

    def _waited(self) -> float:
        return self.hippo.draft_wait_seconds if self.worker and self.hippo is not None else 0.0

    def unwrap(self) -> None:
        """Back to the engine's own methods (the next workload wraps them afresh)."""
        for owner, name, own in reversed(self._wrapped):
            if own is _NOT_OWN:
                delattr(owner, name)
            else:
                setattr(owner, name, own)
        self._wrapped.clear()

    def reset(self) -> None:
        self._step_mark = None  # the previous batch's last step is not this batch's
        self._produced: dict[str, int] = {}
        self._hippo_start = self.hippo.as_dict() if self.hippo is not None else {}
        self.step_hosts: list[tuple[bool, float]] = []  # per engine step: (prefilled, host seconds)
        self._step_ran = self._step_prefills = False
        self.counts = dict.fromkeys(
            ("batched_steps", "target_forwards", "generated_tokens", "spec_rounds", "spec_round_tokens",
             "spec_drafted", "spec_accepted", "runner_seconds", "drafter_seconds", "forward_seconds",
             "overlap_busy_seconds", "overlap_step_seconds"), 0)

    def _count(self, scheduler_output, runner_output) -> None:
        """Runs before vLLM's own update, which trims the step's tokens at max_tokens in place."""
        counts = self.counts
        if scheduler_output.total_num_scheduled_tokens > 0:
            counts["batched_steps"] += 1
            self._step_ran = True
            self._step_prefills = self._step_prefills or bool(scheduler_output.scheduled_new_reqs)
        sampled_all = runner_output.sampled_token_ids
        for req_id in scheduler_output.num_scheduled_tokens:
            index = runner_output.req_id_to_index.get(req_id)
            sampled = list(sampled_all[index]) if sampled_all and index is not None else []
            if not sampled:  # a prefill chunk that samples nothing
                continue
            produced = self._produced.get(req_id, 0)
            kept = sampled[: self.max_tokens - produced]
            stop = next((i for i, token in enumerate(kept) if token in self.stop_ids), None)
            kept = kept if stop is None else kept[: stop + 1]
            self._produced[req_id] = produced + len(kept)
            counts["target_forwards"] += 1
            counts["generated_tokens"] += len(kept)
            spec = scheduler_output.scheduled_spec_decode_tokens.get(req_id) or []
            if spec:
                counts["spec_rounds"] += 1
                counts["spec_round_tokens"] += len(kept)
                counts["spec_drafted"] += len(spec)
                counts["spec_accepted"] += len(sampled) - 1  # vLLM's count: all but the target's own

    def _next_step(self) -> None:
        """Close the running step. With a draft worker of its own: max(target step, the
        worker's drafting for that step) against the step's measured wall time."""
        if not self.worker:
            return
        hippo = self.hippo
        now = (hippo.target_step_seconds, hippo.draft_seconds + hippo.draft_prefill_seconds, time.perf_counter())
        if self._step_mark is not None:
            target, draft, wall = (a - b for a, b in zip(now, self._step_mark))
            self.counts["overlap_busy_seconds"] += max(target, draft)
            self.counts["overlap_step_seconds"] += wall
        self._step_mark = now

    def collect(self) -> dict:
        self._next_step()
        result = dict(self.counts)
        decode = sorted(host for prefilled, host in self.step_hosts if not prefilled)
        result["host_decode_step_median_seconds"] = decode[len(decode) // 2] if decode else None
        result["host_prefill_steps_seconds"] = sum(host for prefilled, host in self.step_hosts if prefilled)
        result["host_engine_steps_seconds"] = sum(host for _, host in self.step_hosts)
        if self.hippo is not None:
            end = self.hippo.as_dict()
            result["hippo"] = {key: end[key] - self._hippo_start[key] for key in end}
        return result
