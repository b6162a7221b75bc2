"""Where the host time of a benchmark row goes: py-spy samples of this process.

``bench_e2e --profile DIR`` records, for each row and workload, py-spy's samples of
the timed batches (the warm-up batch and the engine start are not recorded) into
``DIR/<row>__<workload>.txt``, py-spy's "raw" format: one collapsed stack per line
and its sample count. :func:`summarize` then buckets every sample by the first
frame of its stack that falls in one of ``BUCKETS`` (innermost first), so a
row's host time splits into the models' forwards, hippo's own bookkeeping
(proposer, step records, messages, capture, scoring, the draft's input
preparation) and vLLM's (scheduler, input preparation, sampling).

py-spy runs as a child process attached to this one (``--pid``); it needs ptrace
permission on this process (root, or ``kernel.yama.ptrace_scope`` 0). It is a
benchmark tool, not a dependency of the plugin: ``pip install py-spy``.

Usage: python benchmarks/host_profile.py DIR  (prints the summary of each file)
"""

from __future__ import annotations

import collections
import contextlib
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

SAMPLE_RATE = 250  # per second; py-spy's default is 100

# A frame reads "Class.function (path:line)". A sample inside a model's own code is
# a forward (the benchmark's forward time); the capture's hook runs inside the
# target's forward but is hippo's, so it counts apart. Any other sample counts for
# the innermost frame of hippo's code (what hippo caused, whoever's code it called),
# else for the innermost frame of vLLM's.
CAPTURE = ("hippo capture (in the target's forward)",
           # Not the hook's own frame: it calls the layer's attention through.
           re.compile(r"TargetAttentionCapture\.(?!_wrap)|hippo_vllm/vllm/target/kv_cache_keys\.py|hippo_vllm/ops/"))
MODEL = re.compile(r"\((vllm/model_executor/models/|hippo_testbed/)")
HIPPO_BUCKETS = (
    ("hippo scoring", re.compile(r"hippo_vllm/core/")),
    ("hippo draft (inputs, sampling)", re.compile(r"hippo_vllm/vllm/draft/")),
    ("hippo proposer and records",
     re.compile(r"hippo_vllm/vllm/(target|placements|metrics)/|hippo_vllm/vllm/protocol")),
)
VLLM_BUCKETS = (
    ("vllm draft_model proposer", re.compile(r"vllm/v1/spec_decode/")),
    ("vllm sampler and rejection", re.compile(r"vllm/v1/sample/")),
    ("vllm model runner", re.compile(r"vllm/v1/worker/")),
    ("vllm scheduler and engine", re.compile(r"vllm/v1/(core|engine)/")),
)


def bucket_of(frames: list[str]) -> str:
    """The bucket of one sample's stack (frames outermost first)."""
    if any(CAPTURE[1].search(f) for f in frames):
        return CAPTURE[0]
    if any(MODEL.search(f) for f in frames):
        return "model forward"
    for buckets in (HIPPO_BUCKETS, VLLM_BUCKETS):
        for frame in reversed(frames):
            hit = next((name for name, pattern in buckets if pattern.search(frame)), None)
            if hit is not None:
                return hit
    return "other"


class Recorder:
    """py-spy recording this process into ``path`` between start() and stop()."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        self._proc: subprocess.Popen | None = None

    def start(self) -> None:
        py_spy = shutil.which("py-spy") or str(pathlib.Path(sys.executable).with_name("py-spy"))
        if not os.path.exists(py_spy):
            raise SystemExit("--profile needs py-spy (pip install py-spy)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._proc = subprocess.Popen(
            [py_spy, "record", "--pid", str(os.getpid()), "--rate", str(SAMPLE_RATE), "--format", "raw",
             "--threads", "--nonblocking", "--output", str(self.path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        time.sleep(1.0)  # py-spy attaches before the recorded work starts
        if self._proc.poll() is not None:
            raise SystemExit(f"py-spy could not attach: {self._proc.stderr.read().decode(errors='replace')}")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextlib.contextmanager
def recording(path: pathlib.Path | None):
    """Record the block's samples into ``path`` (nothing when None)."""
    if path is None:
        yield
        return
    recorder = Recorder(path)
    recorder.start()
    try:
        yield
    finally:
        recorder.stop()


def _main_thread_stacks(path: pathlib.Path):
    """(frames outermost first, count) of the samples of the thread that runs the engine steps."""
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        # The engine core runs in this process's main thread (the others are vLLM's and
        # torch's helpers, mostly idle in a wait).
        if frames and "MainThread" not in frames[0] and "process " not in frames[0]:
            continue
        yield frames, int(count)


def summarize(path: pathlib.Path, top: int = 12) -> dict:
    """Samples per bucket, and the innermost hippo functions of the samples outside the forwards."""
    buckets: collections.Counter = collections.Counter()
    hippo_frames: collections.Counter = collections.Counter()
    total = 0
    for frames, count in _main_thread_stacks(path):
        if not any("generate " in f or "step " in f for f in frames):
            continue  # idle between batches
        total += count
        bucket = bucket_of(frames)
        buckets[bucket] += count
        hippo = next((f for f in reversed(frames) if "hippo_vllm/" in f), None)
        if hippo is not None and bucket != "model forward":
            hippo_frames[re.sub(r":\d+\)$", ")", hippo)] += count
    return {"samples": total, "buckets": dict(buckets.most_common()),
            "hippo_functions": dict(hippo_frames.most_common(top))}


def print_summary(path: pathlib.Path) -> None:
    summary = summarize(path)
    total = max(summary["samples"], 1)
    print(f"{path.name}: {summary['samples']} samples of the engine's thread")
    for name, count in summary["buckets"].items():
        print(f"  {100 * count / total:5.1f}%  {name}")
    if summary["hippo_functions"]:
        print("  hippo functions outside the forwards (innermost hippo frame):")
        for name, count in summary["hippo_functions"].items():
            print(f"    {100 * count / total:5.1f}%  {name}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__.split("Usage: ")[1])
    for file in sorted(pathlib.Path(sys.argv[1]).glob("*.txt")):
        print_summary(file)
