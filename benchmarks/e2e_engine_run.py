"""One row's engine in ``bench_e2e.py``: started once, then given a workload's batches one at a time.

``bench_e2e.py`` runs its rows one after another (each engine started, its batches
run, the engine stopped) or, with ``--interleave``, side by side: every row's engine
is started first and each batch then runs in every row in turn, so a machine whose
speed drifts between minutes slows every row alike.
"""

from __future__ import annotations

import gc
import re
import time
from collections.abc import Callable

import host_profile
from e2e_report import summarize
from e2e_step_tracker import StepTracker


class EngineRun:
    """``config``'s engine (``e2e_rows.Config``) and the row of each workload it runs.

    ``check(name, repeat, ids, reference)`` is called on every batch's outputs, the
    reference being the first outputs any row produced for that batch (the target's
    when the target runs each batch first)."""

    def __init__(self, config, args, settings: dict, check: Callable):
        from vllm import LLM

        extra = {"speculative_config": config.speculative_config} if config.speculative_config else {}
        self.config, self.args, self._check = config, args, check
        self.llm = LLM(model=args.target, **settings, **extra)
        self._workload = None

    def start(self, workload) -> None:
        from vllm import SamplingParams

        self._workload = workload
        self._params = SamplingParams(temperature=0.0, max_tokens=workload.max_tokens,
                                      ignore_eos=workload.ignore_eos)
        stops = frozenset() if workload.ignore_eos else frozenset({self.args.eos_id})
        self._tracker = StepTracker(self.llm, workload.max_tokens, self.config.worker, stops)
        self._batches: list[dict] = []
        self._recorder = None
        self._outputs = None

    def run_batch(self, repeat: int, references: dict) -> None:
        """Batch ``repeat`` of the workload (0: the warm-up, not timed), checked against ``references``."""
        workload, tracker = self._workload, self._tracker
        if repeat == 1 and self.args.profile is not None:  # the timed batches only
            self._recorder = host_profile.Recorder(
                self.args.profile / _slug(f"{self.config.name}__{workload.name}.txt"))
            self._recorder.start()
        tracker.reset()
        start, cpu_start = time.perf_counter(), time.process_time()
        outputs = self.llm.generate(workload.batch(repeat), self._params, use_tqdm=False)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        ids = [list(o.outputs[0].token_ids) for o in outputs]
        reference = (workload.name, repeat if workload.fresh_batches else 0)
        references.setdefault(reference, ids)
        self._check(f"{self.config.name} ({workload.name})", repeat, ids, references[reference])
        if repeat:
            self._batches.append({"wall_seconds": wall, "cpu_seconds": cpu, **tracker.collect()})
        self._outputs = outputs

    def finish(self) -> dict:
        """The workload's row, from its timed batches."""
        if self._recorder is not None:
            self._recorder.stop()
            host_profile.print_summary(self._recorder.path)
        self._tracker.unwrap()
        workload = self._workload
        video_total = sum(o.prompt_token_ids.count(self.args.video_pad_id) for o in self._outputs)
        return {"workload": workload.name, "fresh_videos": bool(workload.fresh_batches),
                **summarize(self.config, self._batches, video_total, len(workload.requests))}

    def close(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()  # now, not at garbage collection
        del self.llm
        gc.collect()


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
