"""s_attn per layer straight from the paged KV cache: the kernel, the torch path, the floor.

For one request with 64 text queries after a video of N tokens, one layer's
text→video softmax column sums (``hippo_vllm.ops.video_key_colsum``) are timed

- ``kernel``: the compiled kernel of this device (csrc/), reading the cache;
- ``torch``: the torch fallback (keys gathered from the cache, the core's accumulator);
- ``keys given``: the core's accumulator on keys already gathered (what a key stash
  paid per layer, without the stash's copy and memory);

against the floor: the larger of the key bytes over the measured copy bandwidth and
the time of the work at measured rates (the query-key products at the measured
matrix rate of the kernel's compute dtype, plus the exponentials at the measured
``exp`` rate). Geometries: Qwen2.5-VL-7B (28 q / 4 kv heads), 72B on one device
(64 / 8) and one rank of 72B at TP 4 (16 / 2), d = 128, bf16 keys in the layout the
device's vLLM backend writes (CPU: transposed blocks of 128; CUDA: token rows,
blocks of 16). Each figure is the median of ``--repeats`` calls after a warm-up; on
CUDA each call ends with a synchronisation. The kernel's result is checked against
the torch path before it is timed. Prints a table and writes JSON.

Usage: python benchmarks/bench_target_attention.py [--device cpu|cuda] [--sizes 2048,8192]
                                                   [--large] [--geometries 7b,72b,72b-tp4]
                                                   [--repeats N] [--out PATH]

On 2 CPU cores the default sizes are 2k and 8k tokens (about a minute); ``--large``
adds 16k-64k (minutes). On CUDA the default is 2k, 16k and 64k.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import time

import torch

from hippo_vllm.core import AttentionScoreAccumulator
from hippo_vllm.ops import KeyLayout, gather_video_keys, kernel_status, video_key_colsum, video_key_colsum_torch

GEOMETRIES = {"7b": (28, 4), "72b": (64, 8), "72b-tp4": (16, 2)}  # (query heads, kv heads)
HEAD_DIM, TEXT_QUERIES = 128, 64
LAYOUT = {"cpu": (KeyLayout.TRANSPOSED, 128), "cuda": (KeyLayout.ROWS, 16)}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, device: str, repeats: int) -> float:
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measured_rates(device: str, repeats: int) -> dict[str, float]:
    """Copy bandwidth (bytes read + written per s), matrix rate (FLOP/s) and exp rate (1/s)."""
    source = torch.empty(64 * 2**20 if device == "cpu" else 512 * 2**20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    copy = median_seconds(lambda: target.copy_(source), device, repeats)
    # The kernel computes in float32 on the CPU; tensor-core bf16 is the GPU's matrix rate.
    dtype, n = (torch.float32, 2048) if device == "cpu" else (torch.bfloat16, 8192)
    a = torch.randn(n, n, device=device, dtype=dtype)
    matmul = median_seconds(lambda: a @ a, device, repeats)
    values = torch.randn(2**20 if device == "cpu" else 2**26, device=device)
    results = torch.empty_like(values)  # no allocation (page faults) in the timed call
    exp = median_seconds(lambda: torch.exp(values, out=results), device, repeats)
    return {"copy_bytes_per_s": 2 * source.numel() / copy, "matrix_flop_per_s": 2 * n**3 / matmul,
            "matrix_dtype": str(dtype).removeprefix("torch."), "exp_per_s": values.numel() / exp}


def paged_keys(num_keys: int, num_kv_heads: int, device: str, generator: torch.Generator):
    """A bf16 cache holding the video's keys in the device's layout, blocks in random order."""
    layout, block_size = LAYOUT[device]
    blocks = -(-num_keys // block_size)
    table = torch.randperm(blocks + 8, generator=generator)[:blocks].to(torch.int32)
    keys = torch.randn(blocks * block_size, num_kv_heads, HEAD_DIM, generator=generator).to(torch.bfloat16)
    whole = torch.zeros(blocks + 8, num_kv_heads, block_size, 2 * HEAD_DIM, dtype=torch.bfloat16)
    positions = torch.arange(blocks * block_size)
    block_ids, offsets = table[positions // block_size].long(), positions % block_size
    if layout == KeyLayout.ROWS:
        key_cache = whole[..., :HEAD_DIM]
        key_cache[block_ids, :, offsets, :] = keys
    else:  # vLLM's CPU layout: each (block, head) holds [d, block_size] in its first half
        halves = whole.view(blocks + 8, num_kv_heads, 2 * block_size * HEAD_DIM)
        channels = torch.arange(HEAD_DIM)
        index = channels[None, :] * block_size + offsets[:, None]
        for head in range(num_kv_heads):
            halves[block_ids[:, None], head, index] = keys[:, head, :]
        key_cache = whole.view(blocks + 8, num_kv_heads, 2 * block_size, HEAD_DIM)[:, :, :block_size, :]
    return key_cache.to(device), table.to(device), layout


def bench_one(geometry: str, num_keys: int, device: str, repeats: int, rates: dict) -> dict:
    num_q_heads, num_kv_heads = GEOMETRIES[geometry]
    generator = torch.Generator().manual_seed(num_keys)
    key_cache, table, layout = paged_keys(num_keys, num_kv_heads, device, generator)
    query = torch.randn(TEXT_QUERIES, num_q_heads, HEAD_DIM, generator=generator).to(device, torch.bfloat16)
    scale = HEAD_DIM**-0.5
    out = torch.zeros(num_keys, device=device)

    def kernel():
        out.zero_()
        video_key_colsum(query, key_cache, layout, table, 0, num_keys, scale, out)

    def torch_path():
        return video_key_colsum_torch(query, key_cache, layout, table, 0, num_keys, scale)

    kernel()
    reference = torch_path()
    if not torch.allclose(out, reference, rtol=1e-3, atol=1e-4):
        raise SystemExit(f"{geometry} N={num_keys}: the kernel disagrees with the torch path "
                         f"(max diff {float((out - reference).abs().max()):.3g})")
    given = gather_video_keys(key_cache, layout, table, 0, num_keys).to(torch.bfloat16)

    def keys_given():
        accumulator = AttentionScoreAccumulator(num_keys)
        accumulator.add_layer(query, given, scale=scale)

    key_bytes = num_keys * num_kv_heads * HEAD_DIM * 2
    pairs = TEXT_QUERIES * num_q_heads * num_keys
    floor = max(key_bytes / rates["copy_bytes_per_s"],
                2 * pairs * HEAD_DIM / rates["matrix_flop_per_s"] + pairs / rates["exp_per_s"])
    row = {"geometry": geometry, "q_heads": num_q_heads, "kv_heads": num_kv_heads, "video_tokens": num_keys,
           "floor_s": floor, "kernel_s": median_seconds(kernel, device, repeats),
           "torch_s": median_seconds(torch_path, device, repeats),
           "keys_given_s": median_seconds(keys_given, device, repeats)}
    row["kernel_vs_floor"] = row["kernel_s"] / floor
    row["torch_over_kernel"] = row["torch_s"] / row["kernel_s"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sizes", default=None, help="video tokens, comma-separated")
    parser.add_argument("--large", action="store_true", help="add 16k, 32k and 64k (CPU: minutes)")
    parser.add_argument("--geometries", default=",".join(GEOMETRIES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench_results/target_attention.json")
    args = parser.parse_args()
    sizes = [int(s) for s in (args.sizes or ("2048,8192" if args.device == "cpu" else "2048,16384,65536")).split(",")]
    if args.large:
        sizes = sorted(set(sizes) | {16384, 32768, 65536})
    geometries = args.geometries.split(",")
    unknown = [g for g in geometries if g not in GEOMETRIES]
    if unknown:
        raise SystemExit(f"--geometries: unknown {unknown}; allowed: {sorted(GEOMETRIES)}")
    status = kernel_status(args.device)
    if status != "kernel":
        raise SystemExit(f"no compiled kernel for {args.device}: {status}")

    rates = measured_rates(args.device, args.repeats)
    print(f"device {args.device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
          f"{', ' + torch.cuda.get_device_name() if args.device == 'cuda' else ''}); measured: copy "
          f"{rates['copy_bytes_per_s'] / 1e9:.1f} GB/s, {rates['matrix_dtype']} matrix "
          f"{rates['matrix_flop_per_s'] / 1e9:.1f} GFLOP/s, exp {rates['exp_per_s'] / 1e9:.2f} G/s")
    print(f"one layer, {TEXT_QUERIES} text queries, d={HEAD_DIM}, bf16 keys; times in ms")
    header = f"{'geometry':9} {'video':>6} {'floor':>8} {'kernel':>8} {'torch':>8} {'keys given':>10} " \
             f"{'kernel/floor':>12} {'torch/kernel':>12}"
    print(header)
    rows = []
    for geometry in geometries:
        for size in sizes:
            row = bench_one(geometry, size, args.device, args.repeats, rates)
            rows.append(row)
            print(f"{geometry:9} {size:>6} {row['floor_s'] * 1e3:8.3f} {row['kernel_s'] * 1e3:8.2f} "
                  f"{row['torch_s'] * 1e3:8.2f} {row['keys_given_s'] * 1e3:10.2f} {row['kernel_vs_floor']:12.1f} "
                  f"{row['torch_over_kernel']:12.1f}", flush=True)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": args.device, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                               "rates": rates, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
