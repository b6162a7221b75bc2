"""Pruning study: which video tokens should the draft keep? Measured through the vLLM engine.

HIPPO's claim is that its holistic score (the target's text->video attention, temporal
change, spatial distinctiveness) keeps the video tokens that matter at high pruning,
where attention-only pruning drifts to the frame borders and loses acceptance. This
benchmark measures that claim on the synthetic video QA task
(``hippo_testbed/video_task.py``: known answers, three pruning-adversarial scene
kinds), with real mp4s, through ``vllm.LLM`` with the hippo speculative config.

Rows (one engine per row and schedule; every engine answers all questions in one batch):

- every pruning method (holistic, attention, temporal, uniform, specvlm) at every
  keep ratio;
- ``none`` (keep_ratio 1: the draft sees the whole video) and ``no video``
  (keep_ratio 0: the draft sees the prompt's text only);
- ablations of the holistic score at one keep ratio: each signal off (score_weights),
  crop size 3 and 7 (5 is the default row), per-frame instead of global selection.

Per row: acceptance rate (vLLM's spec-decode counters), MAT in draft-then-verify
(vLLM's mean acceptance length, 1 + accepted / drafts) and in the parallel schedule
(hippo's PEARL MAT, mat_sum / mat_runs, and tokens per target forward), the draft's
own answer accuracy from its pruned view, the boundary selection ratio of the kept
tokens (``hippo_vllm.core.position_bias``), and how many of the tokens showing the
question's object the draft kept (from the task's pixel masks). Ablation rows run the
default schedule only (their MAT in the parallel schedule is not measured).

The draft's answer is read inside the engine: when hippo's draft worker (in the
target's process, the default placement) prefills a request's draft from its view,
this benchmark decodes the draft greedily from that same KV cache, at
the same M-RoPE positions drafting uses, up to the answer's end, then rolls the
draft's KV back so drafting goes on unchanged. It is exactly what the draft would
answer alone from the tokens it kept. (A plain vLLM engine on the draft checkpoint
cannot be given a pruned video: its kept tokens must keep their original positions.)

Every hippo engine's outputs must equal the target alone's, token for token, and every
row must have drafted, or the benchmark aborts. Outputs: a JSON file and three PNGs
(``--plots``): MAT and accuracy against keep ratio, boundary ratio per method, and one
video's frames with each method's kept tokens.

``--questions describe`` asks each sample's description instead of its focus questions:
every object's colour, shape, position and motion, so the draft needs the tokens of
every object, and the correct-answer column compares whole descriptions.

Usage: python benchmarks/bench_pruning_study.py [--quick] [--pair NAME] [--out PATH]
       [--plots DIR] [--samples-per-kind N] [--max-tokens N] [--k K] [--questions focus|describe]
"""

from __future__ import annotations

import os

# In-process engine core, so the proposer (stats) and its in-process draft worker (views, draft KV)
# are reachable.
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # the modules beside this script
from pruning_study_measures import (  # noqa: E402
    ViewRecorder,
    draft_answer_figures,
    is_correct,
    print_table,
    ratio,
    selection_figures,
    summarize,
)

METHODS = ("holistic", "attention", "temporal", "uniform", "specvlm")
KEEP_RATIOS = (0.05, 0.1, 0.25, 0.5)
ABLATION_RATIO = 0.1
# name -> hippo config keys changed from the default holistic score
ABLATIONS = {
    "holistic no attn": {"score_weights": {"attn": 0.0, "temp": 1.0, "spa": 1.0}},
    "holistic no temp": {"score_weights": {"attn": 1.0, "temp": 0.0, "spa": 1.0}},
    "holistic no spa": {"score_weights": {"attn": 1.0, "temp": 1.0, "spa": 0.0}},
    "holistic crop 3": {"crop_size": 3},
    "holistic crop 7": {"crop_size": 7},
    "holistic per_frame": {"selection": "per_frame"},
}
QUICK = {"methods": ("holistic", "attention"), "ratios": (0.1,), "ablations": ("holistic no attn",),
         "references": ("none", "no video"), "samples_per_kind": 1, "max_tokens": 12}
SCHEDULES = {"serial": False, "parallel": True}
DESCRIBE_MAX_TOKENS = 44  # the longest description (38 tokens) plus <|im_end|>, with room
PICTURE_RATIO = 0.1  # the keep ratio whose kept tokens the frame picture shows


@dataclasses.dataclass(frozen=True)
class Pair:
    """The target/draft checkpoints a study runs on."""

    name: str
    target: str
    draft: str
    trained: bool  # trained on the video task (else its answers mean nothing)
    video_tokens: int = 64  # per clip of NUM_FRAMES frames


def load_pair(name: str) -> Pair:
    from hippo_testbed import build_fixtures

    fx = build_fixtures()
    if name == "tiny":
        return Pair("tiny", str(fx.target), str(fx.draft), trained=False)
    if name == "self":  # the target drafts for itself: keep_ratio 1 must reproduce its answers
        return Pair("self", str(fx.target), str(fx.target), trained=False)
    if name in ("trained", "trained-fine"):  # trained on the video task (shipped weights, built on first use)
        from hippo_testbed.trained_pair import FINE_MERGE_SIZE, MERGE_SIZE, trained_pair_paths, video_tokens_per_clip

        merge = FINE_MERGE_SIZE if name == "trained-fine" else MERGE_SIZE
        target, draft = trained_pair_paths(merge_size=merge)
        return Pair(name, str(target), str(draft), trained=True, video_tokens=video_tokens_per_clip(merge))
    raise SystemExit(f"--pair must be one of {PAIRS}, got {name!r}")


PAIRS = ("tiny", "self", "trained", "trained-fine")
# Frames sampled from each 16-frame clip, as the trained pairs were trained: 8 frames of
# 112x112 -> 4 token frames of 4x4 merged tokens (64 video tokens), or of 8x8 unmerged
# patches (256) for trained-fine.
NUM_FRAMES = 8


@dataclasses.dataclass(frozen=True)
class Variant:
    """One hippo configuration of the study."""

    name: str
    group: str  # "grid", "reference" or "ablation"
    method: str  # pruning method, "none" or "no video"
    keep_ratio: float
    keys: dict  # hippo speculative-config keys besides model, k and parallel
    schedules: tuple[str, ...]


def build_variants(methods, ratios, ablations, references) -> list[Variant]:
    both = tuple(SCHEDULES)
    variants = [Variant(f"{m} {r:g}", "grid", m, r, {"pruning": m, "keep_ratio": r}, both)
                for m in methods for r in ratios]
    known = {"none": Variant("none", "reference", "none", 1.0, {"pruning": "none", "keep_ratio": 1.0}, both),
             "no video": Variant("no video", "reference", "no video", 0.0, {"keep_ratio": 0.0}, both)}
    variants += [known[name] for name in references]
    variants += [Variant(name, "ablation", "holistic", ABLATION_RATIO,
                         {"pruning": "holistic", "keep_ratio": ABLATION_RATIO, **ABLATIONS[name]}, ("serial",))
                 for name in ablations]
    return variants


# -- questions -------------------------------------------------------------------------------------


@dataclasses.dataclass
class Question:
    seed: int
    kind: str
    topic: str
    question: str
    answer: str
    video: str  # mp4 path
    frames: object  # uint8 [T, H, W, 3] as decoded for the engine
    masks: object  # int8 [T, H, W] object labels (0 background)
    object_labels: tuple[int, ...]  # mask labels of the objects the question is about


def build_questions(samples_per_kind: int, video_dir: pathlib.Path, asked: str = "focus") -> list[Question]:
    """Questions on held-out samples, the scene kinds taking turns: ``focus``, each
    sample's focus questions; ``describe``, each sample's description (about every object)."""
    from hippo_testbed import load_video
    from hippo_testbed.video_task import HELD_OUT_SEEDS, SCENE_KINDS, make_sample

    video_dir.mkdir(parents=True, exist_ok=True)
    questions = []
    for i in range(samples_per_kind):
        for kind in SCENE_KINDS:
            seed = HELD_OUT_SEEDS[0] + i
            sample = make_sample(seed, kind)
            path = sample.write_mp4(video_dir / f"{kind}_{seed}.mp4")
            frames, metadata = load_video(path, NUM_FRAMES)
            masks = sample.masks[list(metadata["frames_indices"])]  # the decoded frames' masks
            for qa in sample.qa:
                if qa.topic not in (("describe",) if asked == "describe" else sample.focus):
                    continue
                # mover: objects[0]; position question: objects[1]; count and description: every object.
                every = tuple(range(1, len(sample.objects) + 1))
                labels = {"position": (2,), "count": every, "describe": every}.get(qa.topic, (1,))
                questions.append(Question(seed, kind, qa.topic, qa.question, qa.answer, str(path),
                                          (frames, metadata), masks, labels))
    return questions


# -- engine ----------------------------------------------------------------------------------------


TEXT_TOKENS_BUDGET = 64  # per question, beside its video: its prompt's text is ~46 tokens
KV_BYTES_PER_QUESTION = 8 << 20  # target and draft KV of one question, with room to spare


def engine_settings(num_questions: int, video_tokens: int = 64) -> dict:
    """The tests' fast CPU settings, sized so one batch holds every question.

    No bigger than that: a larger max_num_batched_tokens makes every step of the
    hippo engine slower (on a CPU the quick study's 8 questions take about twice as
    long to generate at 4096 as at 1024).
    """
    per_question = video_tokens + TEXT_TOKENS_BUDGET
    batched = 1024 * -(-max(1, num_questions) * per_question // 1024)  # whole KiB of tokens
    return {
        "max_model_len": 1024, "max_num_batched_tokens": batched, "max_num_seqs": max(1, num_questions),
        "limit_mm_per_prompt": {"image": 0, "video": 1}, "seed": 0,
        # Several questions share a video: a prefix-cache hit would skip the target's
        # prefill of it, and with it the attention the attention-based methods rank by.
        "enable_prefix_caching": False,
        "disable_log_stats": False,  # vLLM's spec-decode counters
        # Room for every question's target KV and, beside it, the draft's (sized from the
        # same budget) while the draft's own answers are decoded.
        "dtype": "float32", "enforce_eager": True,
        "kv_cache_memory_bytes": max(64 << 20, max(1, num_questions) * KV_BYTES_PER_QUESTION),
    }


def counter(llm, name: str) -> float:
    return sum(m.value for m in llm.get_metrics() if m.name == name)


def make_requests(questions: list[Question], tokenizer) -> list[dict]:
    from hippo_testbed import video_chat_prompt

    return [{"prompt": video_chat_prompt(tokenizer, q.question), "multi_modal_data": {"video": q.frames}}
            for q in questions]


def start_engine(target: str, settings: dict, speculative_config: dict | None):
    from vllm import LLM

    extra = {"speculative_config": speculative_config} if speculative_config else {}
    return LLM(model=target, **settings, **extra)


def stop_engine(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def generate(llm, requests: list[dict], max_tokens: int) -> list:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    return llm.generate(requests, params, use_tqdm=False)


def check_lossless(name: str, ids: list, reference: list) -> None:
    for i, (ours, theirs) in enumerate(zip(ids, reference)):
        if ours != theirs:
            first = next((j for j, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            raise SystemExit(f"LOSSLESS CHECK FAILED: {name}, question {i} differs from the target at token "
                             f"{first}: {ours[first:first + 8]} vs {theirs[first:first + 8]}")


def run_target(pair: Pair, requests, questions, args) -> dict:
    started = time.perf_counter()
    llm = start_engine(pair.target, engine_settings(len(requests), pair.video_tokens), None)
    try:
        outputs = generate(llm, requests, args.max_tokens)
    finally:
        stop_engine(llm)
    texts = [o.outputs[0].text for o in outputs]
    return {"ids": [list(o.outputs[0].token_ids) for o in outputs], "texts": texts,
            "accuracy": sum(is_correct(t, q.answer) for t, q in zip(texts, questions)) / len(questions),
            "seconds": time.perf_counter() - started}


def run_variant(variant: Variant, schedule: str, pair: Pair, requests, questions, reference, tokenizer,
                args) -> dict:
    """One engine: every question in one batch; the default schedule also reads views and draft answers."""
    spec = {"method": "hippo", "model": pair.draft, "num_speculative_tokens": args.k,
            "parallel": SCHEDULES[schedule], **variant.keys}
    started = time.perf_counter()
    llm = start_engine(pair.target, engine_settings(len(requests), pair.video_tokens), spec)
    try:
        reads_views = schedule == variant.schedules[0]
        recorder = ViewRecorder(llm, args.max_tokens if reads_views else 0,
                                {tokenizer.eos_token_id, *_stop_ids(tokenizer)})
        outputs = generate(llm, requests, args.max_tokens)
        stats = recorder.proposer.stats.as_dict()
        vllm_counts = {name: counter(llm, f"vllm:spec_decode_{name}")
                       for name in ("num_drafts", "num_draft_tokens", "num_accepted_tokens")}
    finally:
        stop_engine(llm)
    ids = [list(o.outputs[0].token_ids) for o in outputs]
    check_lossless(f"{variant.name} ({schedule})", ids, reference)
    if vllm_counts["num_draft_tokens"] <= 0 or stats["draft_tokens"] <= 0:
        raise SystemExit(f"NO DRAFTING: {variant.name} ({schedule}) verified no draft token; "
                         "its figures would not measure the draft")
    if stats["draft_kv_full"] or stats["drafting_failures"]:
        # A request the draft could not hold, or whose drafting failed, runs without drafts:
        # its figures would measure the KV budget or the failure, not the pruning.
        raise SystemExit(f"DRAFTING INCOMPLETE: {variant.name} ({schedule}): draft KV cache full "
                         f"{stats['draft_kv_full']} times, {stats['drafting_failures']} drafting failures; "
                         "raise KV_BYTES_PER_QUESTION")
    row = {"schedule": schedule, "seconds": time.perf_counter() - started, "lossless": True,
           "vllm": vllm_counts, "hippo": stats,
           "acceptance_rate": ratio(vllm_counts["num_accepted_tokens"], vllm_counts["num_draft_tokens"])}
    if schedule == "serial":
        row["mat"] = 1 + vllm_counts["num_accepted_tokens"] / vllm_counts["num_drafts"]
        row["mat_source"] = "vLLM mean acceptance length: 1 + accepted / drafts"
    else:
        row["mat"] = ratio(stats["mat_sum"], stats["mat_runs"])
        row["mat_source"] = "hippo PEARL MAT: mat_sum / mat_runs"
        row["tokens_per_target_forward"] = ratio(stats["committed_tokens"], stats["target_forwards"])
    if reads_views:
        row["selection"] = selection_figures(recorder.views, outputs, questions)
        row["draft_answers"] = draft_answer_figures(recorder.answers, outputs, questions, tokenizer)
    return row


def _stop_ids(tokenizer) -> set[int]:
    ids = {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
    return {i for i in ids if isinstance(i, int) and i >= 0}


# -- main ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="holistic and attention at 0.1, none, no video, one ablation, one sample per kind")
    parser.add_argument("--pair", default="trained", choices=PAIRS,
                        help="target/draft checkpoints (self: the target drafts for itself, a sanity check)")
    parser.add_argument("--methods", help=f"comma-separated pruning methods of the grid, from {METHODS} "
                                          "(default all; quick: holistic,attention)")
    parser.add_argument("--out", type=pathlib.Path, default=None,
                        help="JSON path (default benchmarks/results/pruning_study_<pair>/study.json)")
    parser.add_argument("--plots", type=pathlib.Path, default=None,
                        help="folder for the PNGs (default: beside --out; none with --no-plots)")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--replot", type=pathlib.Path, default=None, metavar="JSON",
                        help="only redraw the PNGs of a saved study (its questions are rebuilt from the seeds)")
    parser.add_argument("--video-dir", type=pathlib.Path, default=None,
                        help="keep the task's mp4s there (default: a temporary folder)")
    parser.add_argument("--samples-per-kind", type=int, help="held-out samples per scene kind (default 8)")
    parser.add_argument("--max-tokens", type=int, help="answer length cap (default 24; 44 with --questions "
                                                        "describe)")
    parser.add_argument("--questions", choices=("focus", "describe"), default="focus",
                        help="focus: each sample's focus questions (default); describe: each sample's "
                             "description, which needs every object")
    parser.add_argument("--k", type=int, default=5, help="num_speculative_tokens (γ, >= 2)")
    args = parser.parse_args(argv)
    defaults = {"samples_per_kind": (8, QUICK["samples_per_kind"]), "max_tokens": (24, QUICK["max_tokens"])}
    if args.questions == "describe":
        defaults["max_tokens"] = (DESCRIBE_MAX_TOKENS, DESCRIBE_MAX_TOKENS)  # a whole description, even quick
    for key, (full, quick) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    methods = QUICK["methods"] if args.quick else METHODS
    args.methods = tuple(m.strip() for m in args.methods.split(",") if m.strip()) if args.methods else methods
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or not args.methods:
        parser.error(f"--methods must list names from {METHODS}, got {unknown or args.methods}")
    if args.out is None:
        suffix = "_describe" if args.questions == "describe" else ""
        args.out = pathlib.Path(f"benchmarks/results/pruning_study_{args.pair}{suffix}/study.json")
    if args.k < 2:
        parser.error(f"--k must be >= 2 (the parallel schedule needs two), got {args.k}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from transformers import AutoTokenizer

    if args.replot is not None:
        return replot(args.replot, args.plots)
    started = time.perf_counter()
    pair = load_pair(args.pair)
    tokenizer = AutoTokenizer.from_pretrained(pair.target)
    with tempfile.TemporaryDirectory() as scratch:  # the engine gets decoded frames, not the files
        questions = build_questions(args.samples_per_kind, args.video_dir or pathlib.Path(scratch), args.questions)
    requests = make_requests(questions, tokenizer)
    if args.quick:
        variants = build_variants(args.methods, QUICK["ratios"], QUICK["ablations"], QUICK["references"])
    else:
        variants = build_variants(args.methods, KEEP_RATIOS, tuple(ABLATIONS), ("none", "no video"))
    print(f"pruning study on pair '{pair.name}': {len(questions)} questions, {len(variants)} rows, "
          f"{sum(len(v.schedules) for v in variants) + 1} engines", flush=True)

    target = run_target(pair, requests, questions, args)
    rows = []
    for variant in variants:
        runs = {s: run_variant(variant, s, pair, requests, questions, target["ids"], tokenizer, args)
                for s in variant.schedules}
        rows.append(summarize(variant, runs))
        print(f"  {variant.name}: outputs equal the target's ({', '.join(variant.schedules)})", flush=True)
    print()
    print_table(rows, target)
    result = {
        "benchmark": "hippo_vllm pruning study",
        "pair": dataclasses.asdict(pair),
        "claim_tested": pair.trained,
        "note": None if pair.trained else (
            "random-weight checkpoints: answers, acceptance and MAT do not test the pruning claim; "
            "the selection figures (boundary ratio, object-token recall) come from random models too"),
        "settings": {"quick": args.quick, "k": args.k, "max_tokens": args.max_tokens, "greedy": True,
                     "questions": args.questions,
                     "samples_per_kind": args.samples_per_kind, "num_questions": len(questions),
                     "keep_ratios": sorted({v.keep_ratio for v in variants if v.group == "grid"}),
                     "ablation_keep_ratio": ABLATION_RATIO, "engine": engine_settings(len(questions))},
        "questions": [{"seed": q.seed, "kind": q.kind, "topic": q.topic, "question": q.question,
                       "answer": q.answer, "video": pathlib.Path(q.video).name} for q in questions],
        "target": {"accuracy": target["accuracy"], "texts": target["texts"]},
        "lossless_checked": True,
        "rows": rows,
        "environment": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version()},
        "seconds": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result) + "\n")
    print(f"wrote {args.out} ({result['seconds']:.0f} s)")
    if not args.no_plots:
        from pruning_study_plots import write_plots  # matplotlib: only when drawing

        written = write_plots(result, questions, args.plots or args.out.parent)
        result["plots"] = [str(p) for p in written]
        print("wrote " + ", ".join(result["plots"]))
    return result


def replot(path: pathlib.Path, folder: pathlib.Path | None) -> dict:
    from pruning_study_plots import write_plots  # matplotlib: only when drawing

    result = json.loads(path.read_text())
    with tempfile.TemporaryDirectory() as scratch:
        questions = build_questions(result["settings"]["samples_per_kind"], pathlib.Path(scratch),
                                    result["settings"].get("questions", "focus"))
    written = write_plots(result, questions, folder or path.parent)
    print("wrote " + ", ".join(str(p) for p in written))
    return result


if __name__ == "__main__":
    main()
