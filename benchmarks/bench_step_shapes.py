"""Which of hippo's target steps could replay a FULL CUDA graph, and which padding would change that.

vLLM replays a FULL CUDA graph only for a "uniform decode" step: every request of
the batch scheduled with exactly 1+K tokens (``GPUModelRunner._is_uniform_decode``
in vLLM 0.33); every other step runs PIECEWISE (attention eagerly between the
graphs). Hippo's steps often mix shapes: a request's conservative step (0 spec
tokens, VPSD after a rejection), chunks cut by the request's token budget, VPSD's
γ−1 optimistic tokens, prefill chunks. This runs the real engine on the tiny
fixtures in both schedules and counts, per step of decode-only batches:

- ``uniform``: steps whose every request has 1+K tokens, K as vLLM sees it (γ in
  draft-then-verify, γ−1 in VPSD): a FULL graph on a GPU;
- ``uniform if padded``: steps that would be uniform if every decode request's
  spec tokens were padded to K (with tokens the rejection sampler then rejects);
- the padded tokens that would cost (extra verify rows, per step).

Three runs: draft-then-verify, draft-then-verify with the proposer's
``pad_drafts_to_k`` on (drafts of k tokens near max_tokens too, what hippo does
when the target replays FULL CUDA graphs), and VPSD (never padded).

It measures shapes only, on the CPU. Whether padding wins is a GPU timing
question: a FULL replay saves the piecewise launch overhead of a step, padding
adds rows to every layer's verify; at small batches the launch overhead dominates.

Usage: python benchmarks/bench_step_shapes.py [--requests 8] [--max-tokens 48] [--json PATH]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from pathlib import Path

# The runner is read in this process: vLLM's in-process engine (before vLLM is imported).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

K = 3


def step_shapes(parallel: bool, num_requests: int, max_tokens: int, pad: bool = False) -> list[list[int]]:
    """Scheduled tokens per request for every decode-only step of one run; ``pad``: the
    proposer's ``pad_drafts_to_k`` (on by itself only under FULL CUDA graphs) switched on."""
    from engine_utils import engine, greedy, hippo_config, text_request, video_request

    from hippo_testbed import build_fixtures

    tiny = build_fixtures()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny.target))
    videos = tiny.synthetic_videos
    requests = [video_request(tokenizer, "Describe this video.", videos[i % len(videos)]) if i % 2 == 0
                else text_request(tokenizer, f"Question {i}: which colours appear?") for i in range(num_requests)]
    shapes: list[list[int]] = []
    with engine(tiny.target, speculative_config=hippo_config(tiny.draft, K, parallel),
                max_num_seqs=num_requests) as llm:
        runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
        runner.drafter.pad_drafts_to_k = pad
        execute_model = runner.execute_model

        def recording(scheduler_output, *args, **kwargs):
            new = {r.req_id for r in scheduler_output.scheduled_new_reqs}
            tokens = scheduler_output.num_scheduled_tokens
            cached = scheduler_output.scheduled_cached_reqs
            resumed = set(getattr(cached, "resumed_req_ids", ()) or ())
            prefilling = any(runner.requests[r].num_computed_tokens < len(runner.requests[r].prompt_token_ids)
                             for r in tokens if r in runner.requests and r not in new)
            if tokens and not new and not resumed and not prefilling:
                shapes.append(sorted(tokens.values()))
            return execute_model(scheduler_output, *args, **kwargs)

        runner.execute_model = recording
        llm.generate(requests, greedy(max_tokens), use_tqdm=False)
    return shapes


def summarise(shapes: list[list[int]], spec_tokens: int) -> dict:
    """``spec_tokens``: what vLLM schedules per request (K, or γ−1 in VPSD); uniform is 1 + that."""
    uniform = sum(all(n == 1 + spec_tokens for n in step) for step in shapes)
    padded_rows = sum(1 + spec_tokens - n for step in shapes for n in step)
    histogram = collections.Counter(n for step in shapes for n in step)
    return {
        "uniform_tokens": 1 + spec_tokens,
        "decode_steps": len(shapes),
        "uniform_steps": uniform,
        "uniform_if_padded": len(shapes),  # every decode-only step, once each request has 1+K rows
        "padding_rows_per_step": padded_rows / max(1, len(shapes)),
        "tokens_per_request_step": {str(k): v for k, v in sorted(histogram.items())},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    for name, value in (("--requests", args.requests), ("--max-tokens", args.max_tokens)):
        if value < 1:
            parser.error(f"{name}={value}: must be >= 1")
    results = {}
    from hippo_vllm.config import HippoConfig

    for schedule, parallel, pad in (("draft-then-verify", False, False), ("draft-then-verify padded", False, True),
                                    ("VPSD", True, False)):
        spec_tokens = HippoConfig(model="draft", num_speculative_tokens=K, parallel=parallel).vllm_num_speculative_tokens
        results[schedule] = summary = summarise(step_shapes(parallel, args.requests, args.max_tokens, pad),
                                                spec_tokens)
        print(f"{schedule:24s} {summary['decode_steps']:4d} decode steps, {summary['uniform_steps']:4d} uniform "
              f"({summary['uniform_tokens']} tokens each: FULL graph), all uniform if padded at "
              f"{summary['padding_rows_per_step']:.1f} padding rows/step; tokens per request-step "
              f"{summary['tokens_per_request_step']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"k": K, "requests": args.requests, "results": results}, indent=2))


if __name__ == "__main__":
    main()
