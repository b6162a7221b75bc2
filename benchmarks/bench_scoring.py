"""Cost of HIPPO's token scoring next to the target prefill it rides on.

For a Qwen2.5-VL-7B draft (embedding width D = 3584) and videos of 2k, 8k and
16k LLM tokens (16×16 tokens per token-frame), this times

- ``holistic_scores`` (s_temp + s_spa + per-frame normalisation + fusion with a
  given s_attn) followed by ``select_tokens(keep_ratio=0.1)``, per call;
- one layer of s_attn reconstruction via ``attention_scores`` with the
  Qwen2.5-VL-7B attention geometry (64 text queries, 28 query heads, 4 KV
  heads, head_dim 128), per layer;

and sets analytic FLOP counts against a Qwen2.5-VL-72B prefill of the same
video. Timings are the median of ``--repeats`` calls after one warm-up, with
torch's default thread count on CPU; on CUDA each call is timed up to a device
synchronisation, so the figure is the device work, not just the launches. Prints
a table and writes JSON.

Usage: python benchmarks/bench_scoring.py [--out PATH] [--repeats N] [--sizes 2048,8192,16384]
                                          [--device cpu|cuda] [--dtype float32|bfloat16]

On a GPU, the sizes users meet are 16k-64k video tokens with bf16 embeddings:
    python benchmarks/bench_scoring.py --device cuda --dtype bfloat16 --sizes 16384,32768,65536
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import time
from collections.abc import Callable

import torch

from hippo_vllm.core import VideoGrid, attention_scores, holistic_scores, select_tokens

DRAFT_WIDTH = 3584  # Qwen2.5-VL-7B hidden size = width of its post-projector video embeddings
TOKENS_PER_SIDE = 16  # 448×448 frames → 16×16 LLM tokens per token-frame
KEEP_RATIO = 0.1
CROP = 5

# Qwen2.5-VL-7B attention geometry, for timing one layer of s_attn.
DRAFT_ATTN = {"text_queries": 64, "q_heads": 28, "kv_heads": 4, "head_dim": 128}

# Qwen2.5-VL-72B target, for the FLOP comparison.
TARGET_PARAMS = 72.7e9
TARGET_LAYERS = 80
TARGET_Q_HEADS = 64
TARGET_HEAD_DIM = 128
TARGET_HIDDEN = 8192
TEXT_QUERIES = 64


def scoring_flops(num_tokens: int, dim: int, crop: int = CROP) -> float:
    """FLOPs of holistic_scores' s_temp + s_spa on ``[num_tokens, dim]`` embeddings.

    Counted: L2 normalisation 3·N·D (square, accumulate, scale); s_temp one dot
    product per token, 2·N·D; s_spa one dot product per neighbour pair. The
    implementation exploits cos(j, u) = cos(u, j) and multiplies out only
    (crop²−1)/2 offsets, so s_spa costs (crop²−1)/2 · 2·N·D (the naive
    per-token count would be (crop²−1) · 2·N·D). Terms linear in N only
    (variance, min-max, fusion, sort) are ignored.
    """
    spatial_offsets = (crop * crop - 1) // 2
    return (3 + 2 + 2 * spatial_offsets) * num_tokens * dim


def s_attn_flops(num_tokens: int) -> float:
    """FLOPs of s_attn for the 72B target over all its layers.

    Counted: the Q·Kᵀ logits only, 2·layers·q_heads·L_txt·N·head_dim (one
    multiply-add = 2 FLOPs). The softmax-weighted sum with V that attention
    itself needs is not part of s_attn; the softmax (≈ a few FLOPs per logit,
    ~1/50 of the logits' cost at head_dim 128) is left out.
    """
    return 2.0 * TARGET_LAYERS * TARGET_Q_HEADS * TEXT_QUERIES * num_tokens * TARGET_HEAD_DIM


def prefill_flops(num_tokens: int) -> float:
    """FLOPs of a Qwen2.5-VL-72B prefill of ``num_tokens`` video tokens + L_txt text tokens.

    With T = N + L_txt:
        dense   = 2 · P · T                                (every weight, one multiply-add per token)
        attention = 2 · 2 · layers · T² · hidden / 2       (Q·Kᵀ and P·V, each 2·T²·hidden
                                                            per layer, halved for the causal mask)
    P = 72.7e9 LLM parameters, layers = 80, hidden = 64 heads · 128 = 8192.
    """
    total = num_tokens + TEXT_QUERIES
    dense = 2.0 * TARGET_PARAMS * total
    attention = 2.0 * 2.0 * TARGET_LAYERS * total * total * TARGET_HIDDEN / 2.0
    return dense + attention


def median_ms(function: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median wall time of ``function`` in ms over ``repeats`` calls, after one warm-up call.

    On CUDA the device is synchronised before and after each call, so queued
    kernels are counted in the call that issued them.
    """

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    function()
    samples = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        function()
        synchronize()
        samples.append(time.perf_counter() - start)
    return 1e3 * statistics.median(samples)


def bench_size(
    num_tokens: int, repeats: int, generator: torch.Generator, device: torch.device, dtype: torch.dtype
) -> dict:
    frames_tokens = TOKENS_PER_SIDE * TOKENS_PER_SIDE
    if num_tokens % frames_tokens:
        raise ValueError(
            f"--sizes entries must be multiples of {frames_tokens} (16×16 tokens per frame), got {num_tokens}"
        )
    grid = VideoGrid(num_tokens // frames_tokens, TOKENS_PER_SIDE, TOKENS_PER_SIDE)
    embeds = torch.randn(grid.num_tokens, DRAFT_WIDTH, generator=generator).to(device, dtype)
    attn = torch.rand(grid.num_tokens, generator=generator)
    attn = (attn / attn.sum()).to(device)

    def score_and_select() -> torch.Tensor:
        return select_tokens(holistic_scores(embeds, grid, attn, crop=CROP), grid, KEEP_RATIO)

    scoring_ms = median_ms(score_and_select, repeats, device)

    q_text = torch.randn(
        DRAFT_ATTN["text_queries"],
        DRAFT_ATTN["q_heads"],
        DRAFT_ATTN["head_dim"],
        generator=generator,
    ).to(device, dtype)
    k_video = torch.randn(
        grid.num_tokens, DRAFT_ATTN["kv_heads"], DRAFT_ATTN["head_dim"], generator=generator
    ).to(device, dtype)
    s_attn_ms = median_ms(lambda: attention_scores(q_text, k_video), repeats, device)

    prefill = prefill_flops(grid.num_tokens)
    scoring = scoring_flops(grid.num_tokens, DRAFT_WIDTH)
    s_attn = s_attn_flops(grid.num_tokens)
    return {
        "tokens": grid.num_tokens,
        "grid": [grid.t, grid.h, grid.w],
        "embed_dim": DRAFT_WIDTH,
        "ms_per_call": scoring_ms,
        "kept_tokens": int(score_and_select().numel()),
        "scoring_gflops": scoring / 1e9,
        "prefill_72b_tflops": prefill / 1e12,
        "scoring_share_of_prefill_pct": 100.0 * scoring / prefill,
        "s_attn_ms_per_layer_7b_geometry": s_attn_ms,
        "s_attn_72b_gflops": s_attn / 1e9,
        "s_attn_share_of_prefill_pct": 100.0 * s_attn / prefill,
    }


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'tokens':>7} {'grid':>10} {'ms/call':>9} {'score GF':>9} {'% 72B pf':>9} "
        f"{'attn ms/L':>10} {'attn GF':>9} {'% 72B pf':>9}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        grid = "×".join(map(str, row["grid"]))
        print(
            f"{row['tokens']:>7} {grid:>10} {row['ms_per_call']:>9.1f} {row['scoring_gflops']:>9.2f} "
            f"{row['scoring_share_of_prefill_pct']:>9.5f} {row['s_attn_ms_per_layer_7b_geometry']:>10.1f} "
            f"{row['s_attn_72b_gflops']:>9.1f} {row['s_attn_share_of_prefill_pct']:>9.4f}"
        )
    print(
        "ms/call: holistic_scores + select_tokens(0.1) at D=3584; "
        "attn ms/L: one s_attn layer (64 text queries, 28 q / 4 kv heads, d=128)\n"
        "GF: analytic GFLOPs (score: s_temp + s_spa; attn: Q·Kᵀ of a 72B target, 80 layers, 64 heads); "
        "% 72B pf: share of a Qwen2.5-VL-72B prefill of the same video"
    )


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--sizes must be comma-separated ints, got {text!r}") from error
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"--sizes must list positive token counts, got {text!r}")
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench_results/scoring.json"))
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed calls per measurement (median reported)"
    )
    parser.add_argument("--sizes", type=parse_sizes, default=[2048, 8192, 16384], help="video token counts")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="dtype of embeddings, q and k")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this torch sees no CUDA device")
    device, dtype = torch.device(args.device), DTYPES[args.dtype]

    generator = torch.Generator().manual_seed(0)
    rows = [bench_size(size, args.repeats, generator, device, dtype) for size in args.sizes]
    print(f"device {device} ({_device_name(device)}), dtype {args.dtype}")
    print_table(rows)
    result = {
        "benchmark": "hippo_vllm.core scoring",
        "device": str(device),
        "device_name": _device_name(device),
        "dtype": args.dtype,
        "keep_ratio": KEEP_RATIO,
        "crop": CROP,
        "repeats": args.repeats,
        "machine": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor(),
            "python": platform.python_version(),
        },
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
