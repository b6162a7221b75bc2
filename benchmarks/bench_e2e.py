"""End-to-end decoding with HIPPO in vLLM, against the target alone and vLLM's draft_model.

In one process, on the same video prompts (greedy, ``ignore_eos``, fixed
``--max-tokens``, float32 and eager, or with ``--production`` bfloat16 with
torch.compile and CUDA graphs), this runs

1. the target alone;
2. vLLM's own ``draft_model`` with the text-only draft (what stock vLLM can do for a
   Qwen2.5-VL target: a text draft never sees the video);
3. hippo, draft-then-verify (``"parallel": false``);
4. hippo, parallel drafting (VPSD, ``"parallel": true``);

rows 3-4 for each draft pair: ``self`` (the target drafts for itself from 10% of
the video), ``self-keep-all`` (the same with every video token) and ``tiny`` (the
smaller draft of the target's family, 10% of the video). Every output must equal the
target's, token for token, or the benchmark aborts.

``--family`` picks the model family whose tiny target and draft run
(``hippo_testbed/families.py``; default Qwen2.5-VL). Row 2's text-only draft is
the tiny Qwen2 language model for every family (the tiny targets' vocabulary);
vLLM's draft_model cannot serve a Qwen2-VL target, so that family has no row 2.

With two or more cores (unless ``--no-worker``) it also measures the draft in a
worker process of its own (``"draft_worker": {"placement": "process"}``): the
target alone with its threads bound to core 0,
then VPSD for each pair with the target on core 0 and the draft worker on core 1,
drafting the next chunk while the target verifies. (vLLM applies
``VLLM_CPU_OMP_THREADS_BIND`` only to the worker processes of its multiprocess
executor; this engine runs in this process, so the benchmark binds this process's
threads to core 0 itself, with one torch thread, for those rows.) For those rows it prints the
overlap efficiency, sum over steps of max(target step, the draft's work for that
step) / the measured step time (1.0: drafting fully hidden; the draft's time is
the worker's own, reported with each answer), and the time the target waited for
the draft.

Target forwards are counted the same way for every row, at the scheduler: one
request in one engine step that produced tokens (its prefill included). MAT is the
mean number of tokens committed per accepted run (PEARL, +1 convention: accepted
draft tokens plus the correction). In draft-then-verify every round ends with a
correction or bonus token, so a run is a round with spec tokens; in VPSD runs span
rounds and only the worker sees the chunk's first-token comparison, so MAT comes
from ``HippoStats``, as do hippo's time breakdown and video counts. Times are wall
clock of the generation only (engine start excluded): the median of ``--repeats``
batches after one warm-up batch, every figure of a row taken from that same batch.

``--models trained`` runs the same rows on the target and draft trained on the synthetic
video task (``hippo_testbed/trained_pair.py``, shipped with the repository) instead of the
random-weight fixtures: the prompts are held-out task questions on task videos, and the
text-only draft of row 2 is the trained draft's own language model without its vision
encoder (`text_only_checkpoint`), so row 2 is that same draft never seeing the video.
Every row then runs, in the same engine, each workload of ``--questions`` (the
description question, whose 20-40-token answer is the video's facts, and the template
questions, whose few-token answers the question largely predicts) at each of
``--batch-sizes``; answers end where the model ends them (no ``ignore_eos``), at most
``DESCRIBE_MAX_TOKENS`` or ``TEMPLATE_MAX_TOKENS``, so every row generates the same tokens.

Host time: the model forwards (target and draft, vision encoders included; for
``draft_model`` and in-process hippo every forward of the draft too) are timed
around the models' own ``forward`` and ``embed_multimodal``; what remains of the
wall time (minus, with a draft worker, the time the target waited for it), per
target engine step, is the host work outside the forwards: scheduling, input
preparation, sampling and verification, and the proposer's own bookkeeping.

Usage: python benchmarks/bench_e2e.py [--out PATH] [--max-tokens N] [--num-prompts N]
       [--num-frames N] [--k K] [--repeats N] [--pairs self,self-keep-all,tiny] [--quick]
       [--production] [--models tiny|trained] [--family NAME]
       [--questions describe,template] [--batch-sizes 1,8]
"""

from __future__ import annotations

import os

# In-process engine core: the runner, the scheduler and hippo's proposer must be
# reachable from here. VLLM_CPU_KVCACHE_SPACE stays unset: on CPU it would override
# kv_cache_memory_bytes below.
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # the scripts beside this one
import host_profile  # noqa: E402
from e2e_report import by_workload, print_note, print_table, times_faster  # noqa: E402

MAX_FRAMES = 16  # hippo_testbed.processor.MAX_FRAMES; engine_settings sizes prompts for it
QUESTIONS = ("Describe this video.", "What moves in the video?", "Which colours appear?",
             "Tell me everything about the objects and their motion.")
KEEP_RATIO = 0.1
# --models trained: the longest answers plus <|im_end|> (the trained pair's tokenizer).
DESCRIBE_MAX_TOKENS, TEMPLATE_MAX_TOKENS = 44, 12
# name -> (the draft: the family's "target" or its "draft", keep_ratio)
PAIRS = {"self": ("target", KEEP_RATIO), "self-keep-all": ("target", 1.0), "tiny": ("draft", KEEP_RATIO)}
DEFAULT_FAMILY = "Qwen2.5-VL"
# Families whose targets vLLM's draft_model cannot serve: for a multimodal target it
# copies the image token id from the config of the architectures it lists and reads
# ``image_token_index`` otherwise, which Qwen2-VL's config lacks (its load fails).
NO_DRAFT_MODEL_ROW = frozenset({"Qwen2-VL"})


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    method: str  # "target", "draft_model" or "hippo"
    speculative_config: dict | None = None
    pair: str | None = None
    cores: frozenset[int] | None = None  # the CPU cores the target's threads are bound to (None: all)

    @property
    def worker(self) -> bool:
        """The draft runs in a worker process of its own."""
        return bool(self.speculative_config and "draft_worker" in self.speculative_config)

    @property
    def parallel(self) -> bool:
        return bool(self.speculative_config and self.speculative_config.get("parallel"))


TARGET_CORE, DRAFT_CORE = 0, 1  # the worker rows: the target's threads on core 0, the draft's on core 1


def build_configs(models: dict[str, pathlib.Path], pairs: list[str], k: int, worker: bool,
                  draft_model: bool = True) -> list[Config]:
    """``models``: the "target", "draft" and "text_draft" checkpoints the rows run."""
    configs = [Config("target", "target")]
    if draft_model:
        spec = {"method": "draft_model", "model": str(models["text_draft"]), "num_speculative_tokens": k}
        configs.append(Config("draft_model text", "draft_model", spec))
    for pair in pairs:
        role, keep_ratio = PAIRS[pair]
        for parallel in (False, True):
            spec = {"method": "hippo", "model": str(models[role]), "num_speculative_tokens": k,
                    "keep_ratio": keep_ratio, "parallel": parallel}
            schedule = "parallel" if parallel else "serial"
            configs.append(Config(f"hippo {schedule} {pair}", "hippo", spec, pair))
    if worker:
        configs.append(Config("target core0", "target", cores=frozenset({TARGET_CORE})))
        for pair in pairs:
            role, keep_ratio = PAIRS[pair]
            spec = {"method": "hippo", "model": str(models[role]), "num_speculative_tokens": k,
                    "keep_ratio": keep_ratio, "parallel": True,
                    "draft_worker": {"placement": "process", "cpu_cores": [DRAFT_CORE]}}
            configs.append(Config(f"hippo parallel {pair} worker", "hippo", spec, pair,
                                  cores=frozenset({TARGET_CORE})))
    return configs


@dataclasses.dataclass(frozen=True)
class TrainedModels:
    """The trained pair in the fixtures' shape: target, draft (the ``tiny`` pair) and text_draft."""

    target: pathlib.Path
    draft: pathlib.Path
    text_draft: pathlib.Path

    def as_dict(self) -> dict:
        return {key: str(value) for key, value in dataclasses.asdict(self).items()}


def trained_models(scratch: pathlib.Path, merge_size: int) -> TrainedModels:
    from hippo_testbed.trained_pair import trained_pair_paths

    target, draft = trained_pair_paths(merge_size=merge_size)
    return TrainedModels(target, draft, text_only_checkpoint(draft, scratch / "text_draft"))


def text_only_checkpoint(vl_dir: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    """A Qwen2ForCausalLM checkpoint of a Qwen2.5-VL checkpoint's language model (vision dropped).

    On text the two compute the same logits: M-RoPE with equal (t, h, w) positions is
    plain RoPE. Weights keep their names (``model.*``, ``lm_head``); tokenizer files are copied.
    """
    import shutil

    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((vl_dir / "config.json").read_text())
    text = dict(config["text_config"])
    rope = {key: value for key, value in text.get("rope_parameters", {}).items() if key != "mrope_section"}
    text.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", rope_parameters=rope,
                tie_word_embeddings=config.get("tie_word_embeddings", False))
    (out / "config.json").write_text(json.dumps(text, indent=2))
    weights = load_file(str(vl_dir / "model.safetensors"))
    save_file({name: w for name, w in weights.items() if not name.startswith("visual.")},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (vl_dir / name).exists():
            shutil.copy(vl_dir / name, out / name)
    return out


@dataclasses.dataclass(frozen=True)
class Workload:
    """One batch of prompts every row generates, with its sampling limits."""

    name: str
    requests: list
    max_tokens: int
    ignore_eos: bool = True
    # --fresh-videos: batch r (0: the warm-up) asks about videos of its own; else every
    # batch repeats ``requests``, and the timed ones reuse the warm-up's encoder outputs.
    fresh_batches: tuple = ()

    def batch(self, repeat: int) -> list:
        return self.fresh_batches[repeat] if self.fresh_batches else self.requests


def task_requests(tokenizer, num_prompts: int, num_frames: int, scratch: pathlib.Path,
                  questions: str = "template", first_sample: int = 0) -> list[dict]:
    """Held-out questions of the synthetic video task, from held-out sample ``first_sample``
    on: ``describe``, each video's description; ``template``, each sample's two focus questions."""
    from hippo_testbed import load_video, video_chat_prompt
    from hippo_testbed.video_task import HELD_OUT_SEEDS, make_sample

    requests, seed = [], HELD_OUT_SEEDS[first_sample]
    while len(requests) < num_prompts:
        sample = make_sample(seed)
        video = load_video(sample.write_mp4(scratch / f"task_{seed}.mp4"), num_frames)
        asked = [qa for qa in sample.qa if qa.topic == "describe"] if questions == "describe" else sample.qa[:2]
        requests += [{"prompt": video_chat_prompt(tokenizer, qa.question), "multi_modal_data": {"video": video}}
                     for qa in asked]
        seed += 1
    return requests[:num_prompts]


def task_workloads(tokenizer, args, scratch: pathlib.Path) -> list[Workload]:
    """Per question kind and batch size, held-out task prompts (answers end at <|im_end|>)."""
    limits = {"describe": DESCRIBE_MAX_TOKENS, "template": TEMPLATE_MAX_TOKENS}
    workloads, next_sample = [], 0
    for questions in args.questions:
        for batch in args.batch_sizes:
            batches = 1 + args.repeats if args.fresh_videos else 1
            # With --fresh-videos every batch of the run, in every workload, has samples of its own.
            made = [task_requests(tokenizer, batch, args.num_frames, scratch, questions,
                                  first_sample=next_sample + i * batch) for i in range(batches)]
            next_sample += batches * batch if args.fresh_videos else 0
            workloads.append(Workload(f"{questions} b{batch}", made[0], min(limits[questions], args.max_tokens),
                                      ignore_eos=False, fresh_batches=tuple(made) if args.fresh_videos else ()))
    return workloads


def engine_settings(args) -> dict:
    """The tests' fast CPU settings (tests/engine_utils.py), sized for one batch of prompts;
    with ``--production``, the settings a GPU user runs instead."""
    sized = {
        # A prompt holds at most 16 frames of at most 64 tokens per frame pair (~600 tokens).
        "max_model_len": 1024 + args.max_tokens,
        # Whole prompts in one step and the whole batch running at once, so every
        # row schedules the same way.
        "max_num_batched_tokens": 4096 + args.max_tokens,
        "max_num_seqs": args.num_prompts,
        "limit_mm_per_prompt": {"image": 0, "video": 1},
        "seed": 0,
        # Repeats resend the same prompts: a prefix-cache hit would skip the target's
        # prefill (and hippo's attention capture) after the warm-up batch.
        "enable_prefix_caching": False,
        "disable_log_stats": True,
    }
    if args.production:
        # bfloat16, torch.compile and CUDA graphs, vLLM's default attention backend and
        # KV-cache sizing (0.4 of the GPU memory: engines start one after another here).
        return {**sized, "dtype": "bfloat16", "enforce_eager": False, "gpu_memory_utilization": 0.4}
    return {**sized, "dtype": "float32", "enforce_eager": True, "kv_cache_memory_bytes": 64 << 20}


def build_requests(fx, tokenizer, num_prompts: int, num_frames: int) -> list[dict]:
    """Synthetic clips alternating with real sample videos (when installed)."""
    from hippo_testbed import load_video, video_chat_prompt

    synthetic, samples = list(fx.synthetic_videos), list(fx.sample_videos)
    videos = [v for pair in zip(synthetic, samples) for v in pair] or synthetic
    videos += [v for v in synthetic + samples if v not in videos]
    return [
        {"prompt": video_chat_prompt(tokenizer, QUESTIONS[i % len(QUESTIONS)]),
         "multi_modal_data": {"video": load_video(videos[i % len(videos)], num_frames)}}
        for i in range(num_prompts)
    ]


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


_torch_set_num_threads = None  # torch's own, taken before vLLM's CPU worker replaces it with a no-op


@contextlib.contextmanager
def threads_bound_to(cores: frozenset[int] | None):
    """Every thread of this process (and those it starts) on ``cores``, torch with one
    thread per core; restored afterwards. A worker process it starts binds itself."""
    if cores is None:
        yield
        return
    import torch

    everywhere, threads = os.sched_getaffinity(0), torch.get_num_threads()

    def bind(mask) -> None:
        for task in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError):  # a thread that just ended
                os.sched_setaffinity(int(task), mask)

    _torch_set_num_threads(len(cores))
    bind(cores)
    try:
        yield
    finally:
        bind(everywhere)
        _torch_set_num_threads(threads)


def run_config(config: Config, workloads: list[Workload], args, references: dict) -> list[dict]:
    """One engine for ``config``; per workload a row. ``references``: each workload's
    target outputs (filled by the first config, the target alone)."""
    with threads_bound_to(config.cores):
        return _run_config(config, workloads, args, references)


def _run_config(config: Config, workloads: list[Workload], args, references: dict) -> list[dict]:
    from vllm import LLM, SamplingParams

    extra = {"speculative_config": config.speculative_config} if config.speculative_config else {}
    llm = LLM(model=args.target, **engine_settings(args), **extra)
    rows = []
    try:
        for workload in workloads:
            params = SamplingParams(temperature=0.0, max_tokens=workload.max_tokens, ignore_eos=workload.ignore_eos)
            stops = frozenset() if workload.ignore_eos else frozenset({args.eos_id})
            tracker = StepTracker(llm, workload.max_tokens, config.worker, stops)
            batches = []
            recorder = None
            for repeat in range(args.repeats + 1):  # the first batch warms up and is not timed
                if repeat == 1 and args.profile is not None:  # the timed batches only
                    recorder = host_profile.Recorder(args.profile / _slug(f"{config.name}__{workload.name}.txt"))
                    recorder.start()
                tracker.reset()
                start, cpu_start = time.perf_counter(), time.process_time()
                outputs = llm.generate(workload.batch(repeat), params, use_tqdm=False)
                wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
                ids = [list(o.outputs[0].token_ids) for o in outputs]
                reference = (workload.name, repeat if workload.fresh_batches else 0)
                references.setdefault(reference, ids)
                check_lossless(f"{config.name} ({workload.name})", repeat, ids, references[reference])
                if repeat:
                    batches.append({"wall_seconds": wall, "cpu_seconds": cpu, **tracker.collect()})
            if recorder is not None:
                recorder.stop()
                host_profile.print_summary(recorder.path)
            tracker.unwrap()
            video_total = sum(o.prompt_token_ids.count(args.video_pad_id) for o in outputs)
            rows.append({"workload": workload.name, "fresh_videos": bool(workload.fresh_batches),
                         **summarize(config, batches, video_total, len(workload.requests))})
    finally:
        llm.llm_engine.engine_core.shutdown()  # now, not at garbage collection
        del llm
        gc.collect()
    return rows


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def check_lossless(name: str, repeat: int, ids: list, reference: list) -> None:
    for i, (ours, theirs) in enumerate(zip(ids, reference)):
        if ours != theirs:
            first = next((j for j, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            raise SystemExit(
                f"LOSSLESS CHECK FAILED: {name}, batch {repeat}, prompt {i} differs from the target "
                f"at token {first}: {ours[first:first + 8]} vs {theirs[first:first + 8]}"
            )


def summarize(config: Config, batches: list[dict], video_total: int, num_prompts: int) -> dict:
    ordered = sorted(batches, key=lambda b: b["wall_seconds"])
    batch = ordered[(len(ordered) - 1) // 2]  # the median batch itself (lower median for even counts)
    wall, tokens, forwards = batch["wall_seconds"], batch["generated_tokens"], batch["target_forwards"]
    hippo = batch.get("hippo")
    if hippo is not None:
        times = {"target": hippo["target_step_seconds"], "draft": hippo["draft_seconds"],
                 "draft_prefill": hippo["draft_prefill_seconds"], "scoring": hippo["pruning_seconds"]}
        seen = (hippo["video_tokens_seen"], hippo["video_tokens_total"])
    else:
        # draft_model's proposer prefills the draft inside the same propose() call,
        # so its draft prefill is part of its draft time (None: not separable).
        drafting = config.method == "draft_model"
        times = {"target": batch["runner_seconds"] - batch["drafter_seconds"], "draft": batch["drafter_seconds"],
                 "draft_prefill": None if drafting else 0.0, "scoring": None if drafting else 0.0}
        seen = (0, video_total) if drafting else None
    times["overhead"] = wall - times["target"] - times["draft"] - (times["draft_prefill"] or 0.0)
    # Outside the forwards: with a worker, the target's wait for it is the draft's time, not host work.
    waited = hippo["draft_wait_seconds"] if config.worker else 0.0
    times["forwards"] = batch["forward_seconds"]
    times["host"] = wall - batch["forward_seconds"] - waited
    if config.parallel:
        mat, mat_source = _ratio(hippo["mat_sum"], hippo["mat_runs"]), "HippoStats mat_sum / mat_runs (PEARL runs)"
    elif config.method == "target":
        mat, mat_source = None, "n/a (no drafting)"
    else:
        mat, mat_source = _ratio(batch["spec_round_tokens"], batch["spec_rounds"]), "tokens committed per round"
    row = {
        "name": config.name, "method": config.method, "pair": config.pair,
        "speculative_config": config.speculative_config,
        "wall_seconds": wall, "wall_seconds_all": [b["wall_seconds"] for b in batches],
        # CPU seconds of this process per wall second: drops when another process competes.
        "cores_busy": min(b["cpu_seconds"] / b["wall_seconds"] for b in batches),
        "cores_allowed": len(config.cores) if config.cores else len(os.sched_getaffinity(0)),
        "generated_tokens": tokens, "tokens_per_second": tokens / wall,
        "target_forwards": forwards, "batched_target_steps": batch["batched_steps"],
        "tokens_per_target_forward": _ratio(tokens, forwards),
        "host_ms_per_target_step": _ratio(1e3 * times["host"], batch["batched_steps"]),
        # The same split: the steps that prefill a request (its video's processing, hippo's
        # scoring and view) apart from the decode steps, whose host work is per step.
        "host_ms_per_decode_step": (None if batch["host_decode_step_median_seconds"] is None
                                    else 1e3 * batch["host_decode_step_median_seconds"]),
        "host_ms_prefill_per_request": 1e3 * batch["host_prefill_steps_seconds"] / num_prompts,
        # Inside the engine's steps only: without the requests' rendering before their first
        # step (the video's decoding and HF processing, the same work in every row), which
        # the figure per target step spreads over fewer steps the more a row commits per step.
        "host_ms_per_engine_step": _ratio(1e3 * batch["host_engine_steps_seconds"], batch["batched_steps"]),
        # And per request, all of it: what the host spends on a request, however many steps.
        "host_ms_per_request": 1e3 * times["host"] / num_prompts,
        "mat": mat, "mat_source": mat_source,
        "spec_acceptance_rate": _ratio(batch["spec_accepted"], batch["spec_drafted"]),
        "video_tokens_seen": seen[0] if seen else None, "video_tokens_total": seen[1] if seen else video_total,
        "seconds": times, "runner_seconds": batch["runner_seconds"], "tracker": batch,
        # Target steps from each request's first token to its first step verifying drafts (hippo).
        "first_draft_steps": _ratio(hippo["first_draft_steps"], hippo["first_drafts"]) if hippo else None,
        "lossless": {"checked_batches": len(batches) + 1, "checked_outputs": (len(batches) + 1) * num_prompts,
                     "equal_to_target": True},
    }
    if config.worker:
        row["worker"] = {
            "overlap_efficiency": _ratio(batch["overlap_busy_seconds"], batch["overlap_step_seconds"]),
            "target_waited_seconds": hippo["draft_wait_seconds"],
            "round_trips": hippo["draft_round_trips"],
            "round_trip_seconds": hippo["draft_round_trip_seconds"],
            "dropped_steps": hippo["draft_dropped_steps"],
            "restarts": hippo["draft_worker_restarts"],
        }
    return row


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def environment(args, fx) -> dict:
    import torch
    import vllm

    return {
        "vllm": vllm.__version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
        "python": platform.python_version(), "fixtures": fx.as_dict(), "engine_settings": engine_settings(args),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench_results/e2e.json"))
    parser.add_argument("--max-tokens", type=int, help="tokens generated per prompt (default 64, quick 16)")
    parser.add_argument("--num-prompts", type=int, help="prompts in the batch (default 4, quick 2)")
    parser.add_argument("--num-frames", type=int, help="frames sampled per video (default 16, quick 8)")
    parser.add_argument("--k", type=int, default=3, help="num_speculative_tokens (γ)")
    parser.add_argument("--repeats", type=int, help="timed batches after the warm-up (default 3, quick 1)")
    parser.add_argument("--pairs", default=None, help=f"comma-separated draft pairs from {sorted(PAIRS)} "
                                                      "(default all; quick: tiny)")
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--models", choices=("tiny", "trained"), default="tiny",
                        help="tiny: the random-weight fixtures; trained: the pair trained on the video task "
                             "(8 frames; answers end at <|im_end|>, --max-tokens caps them)")
    parser.add_argument("--questions", default="describe,template",
                        help="--models trained: comma-separated workloads, 'describe' (the description "
                             "question) and/or 'template' (each video's two focus questions)")
    parser.add_argument("--batch-sizes", default=None,
                        help="--models trained: comma-separated batch sizes, each a workload (default 1,8; "
                             "quick 1)")
    parser.add_argument("--merge-size", type=int, default=None,
                        help="--models trained: which shipped pair, 2 (2x2-merged tokens, 64 per clip; the "
                             "default) or 1 (the fine-grid pair, 256 per clip)")
    parser.add_argument("--fresh-videos", action="store_true",
                        help="--models trained: every batch asks about videos no earlier batch used, so "
                             "the target's and the draft's vision encoders run in every timed batch (by "
                             "default the timed batches repeat the warm-up's videos, whose encoder outputs "
                             "vLLM's encoder cache and hippo's recent encodes keep)")
    parser.add_argument("--family", default=DEFAULT_FAMILY,
                        help="model family of the tiny target and draft (hippo_testbed/families.py; "
                             f"default {DEFAULT_FAMILY}; --models trained is {DEFAULT_FAMILY})")
    parser.add_argument("--no-worker", action="store_true",
                        help="skip the rows with the draft in a worker process of its own")
    parser.add_argument("--rows", default=None,
                        help="comma-separated row names to run (default all); the target row always runs "
                             "first, as every row's reference output")
    parser.add_argument("--profile", type=pathlib.Path, default=None,
                        help="folder for py-spy samples of each row's timed batches, summarized after each "
                             "(benchmarks/host_profile.py; needs py-spy)")
    parser.add_argument("--production", action="store_true",
                        help="bfloat16, torch.compile and CUDA graphs, default KV-cache sizing (GPU settings)")
    args = parser.parse_args(argv)
    defaults = {"max_tokens": (64, 16), "num_prompts": (4, 2), "num_frames": (16, 8), "repeats": (3, 1),
                "pairs": (",".join(PAIRS), "tiny")}
    if args.models == "trained":  # trained on 8 frames per clip; its answers end by themselves
        defaults.update(max_tokens=(DESCRIBE_MAX_TOKENS, DESCRIBE_MAX_TOKENS), num_frames=(8, 8),
                        batch_sizes=("1,8", "1"))
    for key, (full, quick) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    args.questions = [q.strip() for q in args.questions.split(",") if q.strip()]
    if not args.questions or set(args.questions) - {"describe", "template"}:
        parser.error(f"--questions must list 'describe' and/or 'template', got {args.questions}")
    if args.models == "trained":
        try:
            args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
        except ValueError:
            parser.error(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}")
        if not args.batch_sizes or min(args.batch_sizes) < 1:
            parser.error(f"--batch-sizes must be >= 1, got {args.batch_sizes}")
        args.num_prompts = max(args.batch_sizes)  # the engine runs the largest batch at once
        from hippo_testbed.trained_pair import MERGE_SIZE, MERGE_SIZES

        args.merge_size = MERGE_SIZE if args.merge_size is None else args.merge_size
        if args.merge_size not in MERGE_SIZES:
            parser.error(f"--merge-size must be one of {MERGE_SIZES}, got {args.merge_size}")
    elif args.batch_sizes is not None or args.fresh_videos or args.merge_size is not None:
        parser.error("--batch-sizes, --fresh-videos and --merge-size are for --models trained; --num-prompts "
                     "sets the tiny models' batch")
    args.pairs = [p.strip() for p in args.pairs.split(",") if p.strip()]
    unknown = [p for p in args.pairs if p not in PAIRS]
    if unknown or not args.pairs:
        parser.error(f"--pairs must list names from {sorted(PAIRS)}, got {unknown or args.pairs}")
    for key in ("max_tokens", "num_prompts", "num_frames", "k", "repeats"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    from hippo_testbed.families import FAMILY_FIXTURES

    if args.family not in FAMILY_FIXTURES:
        parser.error(f"--family must be one of {sorted(FAMILY_FIXTURES)}, got {args.family!r}")
    if args.models == "trained" and args.family != DEFAULT_FAMILY:
        parser.error(f"--models trained is a {DEFAULT_FAMILY} pair; --family {args.family!r} runs on --models tiny")
    if args.num_frames > MAX_FRAMES:
        parser.error(f"--num-frames must be <= {MAX_FRAMES} (the processor's limit), got {args.num_frames}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch

    global _torch_set_num_threads
    _torch_set_num_threads = _torch_set_num_threads or torch.set_num_threads
    from transformers import AutoTokenizer

    from hippo_testbed import build_fixtures
    from hippo_testbed.families import family_pair

    scratch = tempfile.TemporaryDirectory()  # the trained pair's text-only draft and task videos
    fx = build_fixtures() if args.models == "tiny" else trained_models(pathlib.Path(scratch.name), args.merge_size)
    target, draft = family_pair(args.family) if args.models == "tiny" else (fx.target, fx.draft)
    models = {"target": target, "draft": draft, "text_draft": fx.text_draft}
    tokenizer = AutoTokenizer.from_pretrained(str(target))
    args.target = str(target)
    target_config = json.loads((pathlib.Path(target) / "config.json").read_text())
    # The token a video's rows hold in the prompt (LLaVA-OneVision names it video_token_index).
    args.video_pad_id = target_config.get("video_token_id", target_config.get("video_token_index"))
    args.eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if args.models == "tiny":
        workloads = [Workload("tiny", build_requests(fx, tokenizer, args.num_prompts, args.num_frames),
                              args.max_tokens)]
    else:
        workloads = task_workloads(tokenizer, args, pathlib.Path(scratch.name))
    rows, references = [], {}
    on_gpu = torch.cuda.is_available()
    worker = not args.no_worker and not on_gpu and len(os.sched_getaffinity(0)) >= 2
    if not args.no_worker and on_gpu:
        print("Skipping the draft-worker rows: they bind CPU cores; on GPUs the draft worker is checked by "
              "tests/vllm/test_draft_worker_gpu.py (make gpu-check).")
    elif not args.no_worker and not worker:
        print("Skipping the draft-worker rows: they need two cores (one for the target, one for the draft).")
    draft_model = args.family not in NO_DRAFT_MODEL_ROW
    if not draft_model:
        print(f"Skipping the draft_model row: vLLM's draft_model cannot serve a {args.family} target.")
    configs = build_configs(models, args.pairs, args.k, worker, draft_model)
    if args.rows is not None:
        wanted = {name.strip() for name in args.rows.split(",") if name.strip()}
        unknown = wanted - {c.name for c in configs}
        if unknown:
            raise SystemExit(f"--rows: no row named {sorted(unknown)}; the rows are {[c.name for c in configs]}")
        configs = [c for c in configs if c.name == "target" or c.name in wanted]
    for config in configs:
        started = time.perf_counter()
        config_rows = run_config(config, workloads, args, references)
        for row in config_rows:
            row["engine_and_batches_seconds"] = time.perf_counter() - started  # every workload's together
            print(f"  {config.name} ({row['workload']}): {row['wall_seconds']:.3f} s, outputs equal the target's",
                  flush=True)
        rows += config_rows
    for group in by_workload(rows).values():
        for row in group:
            row["speedup_vs_target"] = times_faster(group[0], row)
    print()
    print_table(rows)
    print_note(rows, os.cpu_count(), torch.get_num_threads(), (TARGET_CORE, DRAFT_CORE))
    result = {
        "benchmark": "hippo_vllm end-to-end generation",
        "settings": {"max_tokens": args.max_tokens, "num_prompts": args.num_prompts, "num_frames": args.num_frames,
                     "k": args.k, "repeats": args.repeats, "pairs": args.pairs, "quick": args.quick,
                     "fresh_videos": args.fresh_videos,
                     "workloads": [{"name": w.name, "prompts": len(w.requests), "max_tokens": w.max_tokens,
                                    "ignore_eos": w.ignore_eos} for w in workloads],
                     "production": args.production, "models": args.models, "family": args.family,
                     "target": args.target, "worker_rows": worker,
                     "greedy": True},
        "lossless_checked": True,
        "environment": environment(args, fx),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
