"""What one decode step of the trained draft costs next to one of the trained target.

Each model runs alone in an in-process vLLM CPU engine (float32, eager), each in
its own process (a second engine in one process runs slower: the CPU worker
cannot rebind its threads), on the same held-out video questions, decoding greedily with the batch sizes below.
A forward hook times every call of the model's forward; calls with exactly one
token per request are decode steps. The draft's median decode-step forward is
divided by the target's, and so is the whole engine step (scheduler, sampler
and forward: generate time over steps): the trained pair is built so that both are
at most 1/5, as a draft must be several times cheaper than its target to pay off.

Usage: python benchmarks/bench_trained_pair.py [--batch-sizes 1 8] [--out PATH]
"""

from __future__ import annotations

import os

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process engine: the model is reachable
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

MAX_RATIO = 0.2
DECODE_TOKENS = 32
ENGINE = {"dtype": "float32", "enforce_eager": True, "kv_cache_memory_bytes": 64 << 20, "max_model_len": 1024,
          "max_num_batched_tokens": 4096, "max_num_seqs": 32, "limit_mm_per_prompt": {"image": 0, "video": 1},
          "seed": 0}


def _requests(tokenizer, folder: pathlib.Path, count: int) -> list[dict]:
    from hippo_testbed import load_video, video_chat_prompt
    from hippo_testbed.trained_pair import NUM_FRAMES
    from hippo_testbed.video_task import HELD_OUT_SEEDS, make_sample

    requests = []
    for seed in HELD_OUT_SEEDS[:count]:
        sample = make_sample(seed)
        path = sample.write_mp4(folder / f"{seed}.mp4")
        requests.append({"prompt": video_chat_prompt(tokenizer, sample.qa[0].question),
                         "multi_modal_data": {"video": load_video(path, NUM_FRAMES)}})
    return requests


def measure(model_dir: pathlib.Path, batch_sizes: list[int], folder: pathlib.Path, repeats: int) -> dict:
    """Per batch size: median decode-step forward ms and whole engine-step ms."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    llm = LLM(model=str(model_dir), **ENGINE)
    model = llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
    calls: list[tuple[int, float]] = []
    started = {}

    def before(module, args, kwargs):
        started["t"] = time.perf_counter()

    def after(module, args, kwargs, output):
        positions = kwargs.get("positions", args[1] if len(args) > 1 else None)
        calls.append((int(positions.shape[-1]), time.perf_counter() - started["t"]))

    model.register_forward_pre_hook(before, with_kwargs=True)
    model.register_forward_hook(after, with_kwargs=True)
    params = SamplingParams(temperature=0.0, max_tokens=DECODE_TOKENS, ignore_eos=True)
    results = {}
    try:
        for batch in batch_sizes:
            requests = _requests(tokenizer, folder, batch)
            llm.generate(requests, params, use_tqdm=False)  # warm-up: caches, allocator
            forward_ms, step_ms = [], []
            for _ in range(repeats):
                calls.clear()
                start = time.perf_counter()
                llm.generate(requests, params, use_tqdm=False)
                elapsed = time.perf_counter() - start
                forward_ms += [1e3 * dt for n, dt in calls if n == batch]
                step_ms.append(1e3 * elapsed / len(calls))
            results[batch] = {"decode_forward_ms": statistics.median(forward_ms),
                              "engine_step_ms": statistics.median(step_ms)}
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    return results


def _measure_in_child(model: pathlib.Path, args) -> dict[int, dict]:
    command = [sys.executable, __file__, "--measure-one", str(model), "--repeats", str(args.repeats),
               "--batch-sizes", *map(str, args.batch_sizes)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return {int(batch): result for batch, result in json.loads(out.strip().splitlines()[-1]).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench_results/trained_pair.json"))
    parser.add_argument("--measure-one", type=pathlib.Path, help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()

    if args.measure_one is not None:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(measure(args.measure_one, args.batch_sizes, pathlib.Path(tmp), args.repeats)))
        return

    from hippo_testbed.trained_pair import build_trained_pair

    pair = build_trained_pair()
    load_before = os.getloadavg()
    measured = {}
    for role, model in (("target", pair.target), ("draft", pair.draft)):
        # Each engine runs in a child process and answers only when done: say what runs.
        print(f"measuring the {role} (batch sizes {args.batch_sizes}, {args.repeats} repeats) ...", flush=True)
        started = time.perf_counter()
        measured[role] = _measure_in_child(model, args)
        print(f"  done in {time.perf_counter() - started:.0f} s", flush=True)
    target, draft = measured["target"], measured["draft"]
    report = {"target": str(pair.target), "draft": str(pair.draft),
              "load_average_before_after": [load_before, os.getloadavg()], "batches": {}}
    ok = True
    for batch in args.batch_sizes:
        ratio = draft[batch]["decode_forward_ms"] / target[batch]["decode_forward_ms"]
        step_ratio = draft[batch]["engine_step_ms"] / target[batch]["engine_step_ms"]
        ok &= ratio <= MAX_RATIO and step_ratio <= MAX_RATIO
        report["batches"][batch] = {"target": target[batch], "draft": draft[batch],
                                    "forward_ratio": ratio, "engine_step_ratio": step_ratio}
        print(f"batch {batch:>2}: decode forward target {target[batch]['decode_forward_ms']:.2f} ms, "
              f"draft {draft[batch]['decode_forward_ms']:.2f} ms, ratio {ratio:.3f} (max {MAX_RATIO}); "
              f"engine step target {target[batch]['engine_step_ms']:.2f} ms, "
              f"draft {draft[batch]['engine_step_ms']:.2f} ms, ratio {step_ratio:.3f} (max {MAX_RATIO})")
    report["ratios_ok"] = ok
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}; draft decode forward and engine step <= {MAX_RATIO} x target's: "
          f"{'yes' if ok else 'NO'}")


if __name__ == "__main__":
    main()
