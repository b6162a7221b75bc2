"""Carry the worker's hippo counters to process 0, where vLLM logs and serves metrics.

The counters (``HippoProposer.stats``) live in the worker. vLLM's stat loggers and
its Prometheus registry live in process 0 (the ``LLM`` process, or the API server
of ``vllm serve``); in vLLM's default multiprocess mode the engine core and the
worker are two further processes. The channel between them is a snapshot file:

- the worker writes ``EXPORTED_STATS`` as JSON to a per-engine path in the temp
  directory, atomically (temp file + ``os.replace``), so a reader sees the old or
  the new snapshot, never half of one;
- process 0 reads it when it logs (every ``VLLM_LOG_STATS_INTERVAL``) and when
  Prometheus is scraped or ``LLM.get_metrics()`` is called.

Why not another channel: vLLM's step outputs carry no free-form field from the
worker to ``SchedulerStats`` (only KV/EC-connector stats, which need a connector),
and a ``collective_rpc`` from process 0 would have to run inside the engine core's
busy loop, between steps, from a synchronous logger or scrape callback. A file
needs no vLLM change and reads the same in-process and across processes.

The path is derived from what every process shares: ``vllm_config.instance_id``
(vLLM suffixes it with ``_dp<rank>`` per data-parallel engine; the suffix is
dropped here and the rank used as the engine index, which is what process 0 calls
each engine) and the temp directory.

Publishing is off the step path: a daemon thread compares the counters with the
last snapshot every ``SNAPSHOT_INTERVAL_S`` and writes only on change, so a step
never waits for the file system and the snapshot is at most that old. Every
failure is logged once and otherwise ignored; drafting never depends on it. The
file is removed when the runner shuts down, the proposer is gone or the process
exits, and process 0 removes it too at exit (a worker that is killed cannot).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Any

from hippo_vllm.logs import get_logger
from hippo_vllm.vllm.metrics.stats import EXPORTED_STATS

logger = get_logger(__name__)

SNAPSHOT_INTERVAL_S = 0.5
SNAPSHOT_FORMAT = 1  # bump when the file layout changes, so a reader can refuse it

# proposer -> its publisher (None: starting it failed, do not retry every step).
_publishers: weakref.WeakKeyDictionary[Any, StatsPublisher | None] = weakref.WeakKeyDictionary()


def snapshot_path(instance_id: str, engine_index: int) -> Path:
    """Where the worker of one engine of one vLLM instance keeps its snapshot."""
    safe_id = re.sub(r"[^A-Za-z0-9_.-]", "_", instance_id)
    return Path(tempfile.gettempdir()) / f"hippo_vllm-stats-{safe_id}-engine{engine_index}.json"


def worker_snapshot_path(vllm_config: Any) -> Path:
    """The snapshot path of the engine a worker belongs to."""
    dp_rank = vllm_config.parallel_config.data_parallel_rank
    base_id = vllm_config.instance_id.removesuffix(f"_dp{dp_rank}")
    return snapshot_path(base_id, dp_rank)


def write_snapshot(path: Path, values: dict[str, float]) -> None:
    payload = json.dumps({"format": SNAPSHOT_FORMAT, "pid": os.getpid(), "stats": values})
    # mkstemp: an unpredictable, exclusively created name in a shared temp directory.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as file:
            file.write(payload)
        os.replace(tmp, path)
    except BaseException:
        remove_snapshot(Path(tmp))
        raise


def read_snapshot(path: Path) -> dict[str, float] | None:
    """The exported values in the snapshot; None when there is none (yet)."""
    try:
        payload = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    if payload.get("format") != SNAPSHOT_FORMAT:
        raise ValueError(f"{path}: snapshot format {payload.get('format')!r}, expected {SNAPSHOT_FORMAT}")
    stats = payload["stats"]
    return {field: stats.get(field, 0) for field in EXPORTED_STATS}


def remove_snapshot(path: Path) -> None:
    # Best effort: a leftover snapshot is a few bytes in the temp directory.
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


class SnapshotReader:
    """Process 0's view of one engine's snapshot: zeros until the worker publishes."""

    def __init__(self, path: Path):
        self.path = path
        self._last = dict.fromkeys(EXPORTED_STATS, 0)
        self._warned = False

    def read(self) -> dict[str, float]:
        """The latest values; on a read error the previous ones (logged once)."""
        try:
            values = read_snapshot(self.path)
        except Exception:
            if not self._warned:
                self._warned = True
                logger.exception(
                    "hippo: cannot read the stats snapshot %s; figures stay as they were", self.path
                )
            return dict(self._last)
        if values is not None:
            self._last = values
        return dict(self._last)


class StatsPublisher:
    """Writes one proposer's counters to its snapshot from a background thread."""

    def __init__(self, proposer: Any, path: Path, interval: float = SNAPSHOT_INTERVAL_S):
        # Weak, so the publisher does not keep a shut-down engine's proposer alive;
        # its disappearance is the signal to stop.
        self._proposer = weakref.ref(proposer)
        self.path = path
        self._interval = interval
        self._stop = threading.Event()
        self._published: dict[str, float] | None = None
        self._failed = False
        self._thread = threading.Thread(target=self._run, name="hippo-stats-publisher", daemon=True)

    def start(self) -> None:
        self._thread.start()
        atexit.register(self.close)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            proposer = self._proposer()
            if proposer is None:  # the engine is gone: nothing is left to close at exit
                atexit.unregister(self.close)
                break
            self.publish(proposer.stats.exported())
            del proposer
        remove_snapshot(self.path)

    def publish(self, values: dict[str, float]) -> None:
        if values == self._published:
            return
        try:
            write_snapshot(self.path, values)
        except Exception:
            if not self._failed:
                self._failed = True
                logger.exception("hippo: cannot write the stats snapshot %s; /metrics will lag", self.path)
            return
        self._published = values

    def close(self) -> None:
        """Stop publishing and remove the snapshot (at exit, or by hand)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * self._interval)
        remove_snapshot(self.path)


def _reports_for_engine() -> bool:
    """Only the output rank publishes: under tensor parallelism it is the one that drafts."""
    from hippo_vllm.vllm.tensor_parallel import is_output_rank

    return is_output_rank()


def ensure_exporting(proposer: Any) -> None:
    """Start exporting ``proposer.stats`` once; the hippo runner calls this every step.

    After the first call it is one weak-dictionary lookup.
    """
    if proposer in _publishers:
        return
    publisher = None
    try:
        if _reports_for_engine():
            publisher = StatsPublisher(proposer, worker_snapshot_path(proposer.vllm_config))
            publisher.start()
    except Exception:
        logger.exception("hippo: stats export disabled; hippo figures will not reach logs or /metrics")
        publisher = None
    _publishers[proposer] = publisher


def stop_exporting(proposer: Any) -> None:
    """Stop the proposer's publisher and remove its snapshot (the runner's shutdown)."""
    publisher = _publishers.pop(proposer, None) if proposer is not None else None
    if publisher is not None:
        atexit.unregister(publisher.close)
        publisher.close()
