"""Run `vllm serve` as a child process: free port, bounded health wait, clean stop.

Shared by the serving demo (`examples/serve_demo.py`, which finds it next to
itself) and the OpenAI-server tests (`tests/server/`, which put `examples/` on
`sys.path`). It lives here rather than in `hippo_vllm/` because it is tooling
around the `vllm` command, not part of the plugin that vLLM loads.

The server is started in its own session (process group), because `vllm serve`
spawns an engine-core process (and, in the default multiprocess mode, a worker
process); signalling only the API server could leave those behind holding memory
and cores. Its output goes to a log file, not a pipe: nobody reads a pipe while
the server runs, and a full pipe would block it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
# The environment's `vllm` script. On the CPU wheel it is the launcher from
# tools/cpu_env/vllm_cli.py (README, "The CPU environment fixes"); on a GPU environment, vLLM's own script.
VLLM_EXECUTABLE = Path(sys.executable).with_name("vllm")


# How the fixtures' clips are decoded in the chat path: vLLM's generic OpenCV loader,
# 8 frames spread evenly over the clip, as hippo_testbed.videos.load_video decodes them
# for training and the engine tests. Without "video_backend", vLLM picks its
# "qwen2_vl" loader for a checkpoint whose video processor is Qwen2VLVideoProcessor
# (Qwen2-VL, Qwen2.5-VL); that loader ignores num_frames and samples 2 frames per
# second, which gives a 2-s, 8-fps fixture clip 4 frames (32 video tokens, not 64).
FIXTURE_VIDEO_FRAMES = 8
FIXTURE_VIDEO_IO = {"video": {"video_backend": "opencv", "num_frames": FIXTURE_VIDEO_FRAMES}}


def fast_cpu_serve_args(media_dir: str | Path, *, served_model_name: str = "tiny",
                        speculative_config: dict | None = None) -> list[str]:
    """`vllm serve` flags that start the tiny fixtures quickly on a CPU.

    - `--enforce-eager`: torch.compile on CPU adds ~25 s at start;
    - `--kv-cache-memory-bytes`: without it the CPU backend allocates ~9 GiB of KV
      cache (+14 s, +8 GB). `VLLM_CPU_KVCACHE_SPACE` must stay unset: it would
      override this flag;
    - small `--max-model-len` / `--max-num-seqs` and one video, no image, per prompt
      keep profiling and buffers small;
    - float32, like the engine tests: the tiny random models' logits have near
      ties, which bfloat16 rounding can resolve differently in a one-token decode
      step and in a multi-token verification step;
    - `--allowed-local-media-path`: `file://` video URLs are refused outside it;
    - the fixtures' video decoding (`FIXTURE_VIDEO_IO`): 8 frames of a 16-frame
      clip, 64 video tokens, the frames the trained pair was trained on.
    """
    settings = ["--dtype", "float32", "--enforce-eager", "--kv-cache-memory-bytes", str(64 << 20)]
    return _serve_args(media_dir, served_model_name, speculative_config, settings)


def gpu_serve_args(media_dir: str | Path, *, served_model_name: str = "tiny",
                   speculative_config: dict | None = None, tensor_parallel_size: int = 1) -> list[str]:
    """`vllm serve` flags for the tiny fixtures at the settings a GPU user runs.

    bfloat16, torch.compile and CUDA graphs (no `--enforce-eager`), vLLM's default
    attention backend and KV-cache sizing from profiling, at 0.4 of the GPU memory
    so that a previous engine's leftovers do not fail the free-memory check at start;
    the same prompt limits and video decoding as `fast_cpu_serve_args`.
    """
    settings = ["--dtype", "bfloat16", "--gpu-memory-utilization", "0.4",
                "--tensor-parallel-size", str(tensor_parallel_size)]
    return _serve_args(media_dir, served_model_name, speculative_config, settings)


def _serve_args(media_dir: str | Path, served_model_name: str, speculative_config: dict | None,
                settings: list[str]) -> list[str]:
    """The flags both settings share (prompt limits, video decoding, seed) plus ``settings``."""
    args = [
        "--served-model-name", served_model_name,
        *settings,
        "--max-model-len", "1024",
        "--max-num-seqs", "4",
        "--limit-mm-per-prompt", json.dumps({"image": 0, "video": 1}),
        "--allowed-local-media-path", str(media_dir),
        "--media-io-kwargs", json.dumps(FIXTURE_VIDEO_IO),
        "--seed", "0",
    ]
    if speculative_config is not None:
        args += ["--speculative-config", json.dumps(speculative_config)]
    return args


class ServerStartError(RuntimeError):
    """The server exited or did not become healthy in time; the message has the log tail."""


def free_port() -> int:
    """A TCP port on HOST that nothing listens on right now.

    The port is released before vLLM binds it, so another program could take it in
    between; `running_server` retries on a fresh port when that happens.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    """(status, body) of a GET; a refused connection raises OSError."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")


@dataclass
class ServerProcess:
    process: subprocess.Popen
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def openai_base_url(self) -> str:
        return f"{self.base_url}/v1"

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "<no log>"
        return "\n".join(text.splitlines()[-lines:])

    def is_healthy(self) -> bool:
        try:
            return http_get(f"{self.base_url}/health", timeout=2.0)[0] == 200
        except OSError:
            return False

    def wait_until_healthy(self, timeout: float, progress: Callable[[float], None] | None = None,
                           progress_every: float = 5.0) -> float:
        """Seconds until `/health` answered 200; raises ServerStartError on exit or timeout.

        `progress(elapsed)` is called about every `progress_every` seconds while waiting.
        """
        start = time.monotonic()
        last_report = start
        while True:
            elapsed = time.monotonic() - start
            if self.is_healthy():
                return elapsed
            if self.process.poll() is not None:
                raise ServerStartError(
                    f"vllm serve exited with code {self.process.returncode} before it was healthy; "
                    f"log {self.log_path}, last lines:\n{self.log_tail()}"
                )
            if elapsed > timeout:
                raise ServerStartError(
                    f"vllm serve was not healthy after {timeout:.0f} s; log {self.log_path}, "
                    f"last lines:\n{self.log_tail()}"
                )
            if progress is not None and time.monotonic() - last_report >= progress_every:
                progress(elapsed)
                last_report = time.monotonic()
            time.sleep(0.5)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the whole process group, wait, then SIGKILL whatever is left."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout)
        # The engine core can outlive the API server; the group id still reaches it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5.0)


def _launch(model: str | Path, args: Sequence[str], port: int, log_path: Path,
            env: dict[str, str] | None) -> ServerProcess:
    command = [str(VLLM_EXECUTABLE), "serve", str(model), "--host", HOST, "--port", str(port), *args]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})}, start_new_session=True,
        )
    return ServerProcess(process, port, log_path)


def start_server(model: str | Path, args: Sequence[str], log_path: Path, *,
                 env: dict[str, str] | None = None) -> ServerProcess:
    """Start `vllm serve model args...` on a free port of 127.0.0.1 (not yet healthy)."""
    return _launch(model, args, free_port(), log_path, env)


def _lost_port_race(server: ServerProcess) -> bool:
    return server.process.poll() is not None and "Address already in use" in server.log_tail(80)


@contextlib.contextmanager
def running_server(model: str | Path, args: Sequence[str], log_path: Path, *,
                   env: dict[str, str] | None = None, timeout: float = 180.0,
                   progress: Callable[[float], None] | None = None) -> Iterator[ServerProcess]:
    """A healthy server for the `with` block, stopped afterwards whatever happens.

    Retries once on a fresh port if another program took the chosen one first.
    """
    for attempt in (1, 2):
        server = start_server(model, args, log_path, env=env)
        try:
            server.wait_until_healthy(timeout, progress)
            break
        except BaseException as error:  # also Ctrl-C while waiting: never leave it running
            server.stop()
            if attempt == 2 or not isinstance(error, ServerStartError) or not _lost_port_race(server):
                raise
    try:
        yield server
    finally:
        server.stop()


@dataclass(frozen=True)
class MetricSample:
    name: str  # counters keep their `_total` suffix: `vllm:spec_decode_num_drafts_total`
    labels: dict[str, str]
    value: float


def read_metrics(base_url: str) -> list[MetricSample]:
    """Every sample of the server's Prometheus `/metrics`, without `_created` timestamps."""
    from prometheus_client.parser import text_string_to_metric_families

    status, body = http_get(f"{base_url}/metrics")
    if status != 200:
        raise RuntimeError(f"GET {base_url}/metrics answered {status}: {body[:200]}")
    return [
        MetricSample(sample.name, dict(sample.labels), sample.value)
        for family in text_string_to_metric_families(body)
        for sample in family.samples
        if not sample.name.endswith("_created")
    ]


def metric_totals(samples: Sequence[MetricSample]) -> dict[str, float]:
    """Sample values summed over label sets (engines, models, positions), by name."""
    totals: dict[str, float] = {}
    for sample in samples:
        totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals
