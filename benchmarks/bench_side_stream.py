"""Does a CUDA side stream let the host run ahead of in-process drafting?

Drafting on a side stream can only overlap the target's forward if the host
returns from issuing the draft work before that work is done. Each draft step
copies small host tensors (positions, slot mapping, block table, query lengths)
to the device. This measures, on one CUDA device, how long the host is held by
such a copy issued on a side stream that still has queued work:

- ``blocking``: ``tensor.to(device)`` from pageable memory, as a draft step does;
- ``pinned non_blocking``: ``pinned.to(device, non_blocking=True)``.

The queued work is a chain of bf16 matrix products sized to take tens of
milliseconds. If the blocking copy holds the host for about as long as the
queued work, the host could not have issued the target's forward in the
meantime: a side stream built from such steps overlaps nothing.

Usage: python benchmarks/bench_side_stream.py [--out PATH]  (needs a CUDA device)
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import torch


def _queue_work(a: torch.Tensor, repeats: int) -> None:
    for _ in range(repeats):
        torch.matmul(a, a)


def _host_ms(copy, stream: torch.cuda.Stream, a: torch.Tensor, repeats: int) -> tuple[float, float]:
    """(host ms held by ``copy`` after queuing work on ``stream``, ms of the queued work)."""
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start_event.record()
        _queue_work(a, repeats)
        end_event.record()
        start = time.perf_counter()
        copy()
        held = time.perf_counter() - start
    torch.cuda.synchronize()
    return 1e3 * held, start_event.elapsed_time(end_event)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench_results/side_stream.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    device = torch.device("cuda")
    stream = torch.cuda.Stream(device)
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    positions = torch.arange(4096, dtype=torch.int64)  # a draft step's host-side inputs
    pinned = positions.pin_memory()
    copies = {
        "blocking": lambda: positions.to(device),
        "pinned non_blocking": lambda: pinned.to(device, non_blocking=True),
    }
    _host_ms(copies["blocking"], stream, a, 2)  # warm-up
    rows = []
    for name, copy in copies.items():
        samples = [_host_ms(copy, stream, a, 40) for _ in range(5)]
        held = statistics.median(s[0] for s in samples)
        queued = statistics.median(s[1] for s in samples)
        rows.append({"copy": name, "host_held_ms": held, "queued_work_ms": queued})
        print(f"{name:>20}: host held {held:8.2f} ms while {queued:8.2f} ms of work was queued on the side stream")
    result = {"benchmark": "side-stream host blocking", "device": torch.cuda.get_device_name(device),
              "torch": torch.__version__, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
