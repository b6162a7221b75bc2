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
draft-then-verify with target and draft on core 0 (what the target's device does without a
second one), then VPSD for each pair with the target on core 0 and the draft worker on core 1,
drafting the next chunk while the target verifies, with chunks of γ and with PEARL's
adaptive length (``"draft_length": "adaptive"``, at most ``--adaptive-cap`` tokens). (vLLM applies
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
batches after one warm-up batch, every figure of a row taken from that same batch
but the host figures, which sum over all timed batches (see below).

``--models trained`` runs the same rows on the target and draft trained on the synthetic
video task (``hippo_testbed/trained_pair.py``, shipped with the repository) instead of the
random-weight fixtures: the prompts are held-out task questions on task videos, and the
text-only draft of row 2 is the trained draft's own language model without its vision
encoder (`e2e_workloads.text_only_checkpoint`), so row 2 is that same draft never seeing the video.
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
preparation, sampling and verification, and the proposer's own bookkeeping. It is
summed over all timed batches, the same batches in every row (the median batch is
another one in each row, with other videos and another number of steps).

``--interleave`` (with ``--no-worker``) starts every row's engine first and then runs
each batch in every row in turn, the target first and the others in an order rotating
by batch: on a machine whose speed drifts between minutes, every row's batches meet
the same drift, where rows run one after another each meet their own.

Usage: python benchmarks/bench_e2e.py [--out PATH] [--max-tokens N] [--num-prompts N]
       [--num-frames N] [--k K] [--adaptive-cap N] [--repeats N] [--pairs self,self-keep-all,tiny] [--quick]
       [--production] [--models tiny|trained] [--family NAME]
       [--questions describe,template] [--batch-sizes 1,8] [--interleave --no-worker]
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
import json  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # the scripts beside this one
from e2e_engine_run import EngineRun  # noqa: E402
from e2e_report import by_workload, print_note, print_table, times_faster  # noqa: E402
from e2e_rows import DRAFT_CORE, PAIRS, TARGET_CORE, Config, build_configs  # noqa: E402
from e2e_workloads import (  # noqa: E402
    DESCRIBE_MAX_TOKENS,
    Workload,
    build_requests,
    task_workloads,
    trained_models,
)

MAX_FRAMES = 16  # hippo_testbed.processor.MAX_FRAMES; engine_settings sizes prompts for it
DEFAULT_FAMILY = "Qwen2.5-VL"
# Families whose targets vLLM's draft_model cannot serve: for a multimodal target it
# copies the image token id from the config of the architectures it lists and reads
# ``image_token_index`` otherwise, which Qwen2-VL's config lacks (its load fails).
NO_DRAFT_MODEL_ROW = frozenset({"Qwen2-VL"})


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
    """One engine for ``config``; per workload a row. ``references``: each batch's target
    outputs (filled by the first config, the target alone)."""
    with threads_bound_to(config.cores):
        run = EngineRun(config, args, engine_settings(args), _check)
        try:
            rows = []
            for workload in workloads:
                run.start(workload)
                for repeat in range(args.repeats + 1):  # the first batch warms up and is not timed
                    run.run_batch(repeat, references)
                rows.append(run.finish())
            return rows
        finally:
            run.close()


def run_interleaved(configs: list[Config], workloads: list[Workload], args, references: dict) -> list[dict]:
    """``--interleave``: every config's engine at once, each batch in every row in turn: the
    target first (its outputs are the batch's reference), the others in an order that
    rotates by batch, so no row always runs right after the same one."""
    runs = []
    try:
        for config in configs:
            runs.append(EngineRun(config, args, engine_settings(args), _check))
        rows = []
        for workload in workloads:
            for run in runs:
                run.start(workload)
            reference, others = runs[0], runs[1:]
            for repeat in range(args.repeats + 1):  # the first batch warms up and is not timed
                shift = repeat % len(others) if others else 0
                for run in [reference, *others[shift:], *others[:shift]]:
                    run.run_batch(repeat, references)
            rows += [run.finish() for run in runs]
        return rows
    finally:
        for run in runs:
            run.close()


def _check(name: str, repeat: int, ids: list, reference: list) -> None:
    check_lossless(name, repeat, ids, reference)  # looked up when called (the tests record it)


def check_lossless(name: str, repeat: int, ids: list, reference: list) -> None:
    for i, (ours, theirs) in enumerate(zip(ids, reference)):
        if ours != theirs:
            first = next((j for j, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            raise SystemExit(
                f"LOSSLESS CHECK FAILED: {name}, batch {repeat}, prompt {i} differs from the target "
                f"at token {first}: {ours[first:first + 8]} vs {theirs[first:first + 8]}"
            )


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
    parser.add_argument("--adaptive-cap", type=int, default=8,
                        help="num_speculative_tokens of the adaptive-length worker rows (the most a round "
                             "drafts; >= 2)")
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
    parser.add_argument("--interleave", action="store_true",
                        help="start every row's engine first, then run each batch in every row in turn (the "
                             "target first, the others in an order rotating by batch), so a machine whose "
                             "speed drifts slows every row alike (with --no-worker; not with --profile)")
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
    if args.interleave and (not args.no_worker or args.profile is not None):
        parser.error("--interleave runs every row's engine at once on all cores: add --no-worker (the worker "
                     "rows bind this process's threads to one core) and leave out --profile (it samples the "
                     "whole process)")
    args.pairs = [p.strip() for p in args.pairs.split(",") if p.strip()]
    unknown = [p for p in args.pairs if p not in PAIRS]
    if unknown or not args.pairs:
        parser.error(f"--pairs must list names from {sorted(PAIRS)}, got {unknown or args.pairs}")
    for key in ("max_tokens", "num_prompts", "num_frames", "k", "repeats"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.adaptive_cap < 2:
        parser.error(f"--adaptive-cap must be >= 2 (a VPSD round drafts at least two), got {args.adaptive_cap}")
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
    configs = build_configs(models, args.pairs, args.k, worker, draft_model, args.adaptive_cap)
    if args.rows is not None:
        wanted = {name.strip() for name in args.rows.split(",") if name.strip()}
        unknown = wanted - {c.name for c in configs}
        if unknown:
            raise SystemExit(f"--rows: no row named {sorted(unknown)}; the rows are {[c.name for c in configs]}")
        configs = [c for c in configs if c.name == "target" or c.name in wanted]
    if args.interleave:
        rows = run_interleaved(configs, workloads, args, references)
    else:
        for config in configs:
            started = time.perf_counter()
            config_rows = run_config(config, workloads, args, references)
            for row in config_rows:
                row["engine_and_batches_seconds"] = time.perf_counter() - started  # every workload's together
                print(f"  {config.name} ({row['workload']}): {row['wall_seconds']:.3f} s, outputs equal the "
                      "target's", flush=True)
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
                     "k": args.k, "adaptive_cap": args.adaptive_cap, "repeats": args.repeats, "pairs": args.pairs,
                     "quick": args.quick,
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
