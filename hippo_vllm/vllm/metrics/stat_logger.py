"""Hippo's figures in vLLM's periodic stats log, on ``/metrics`` and in ``LLM.get_metrics()``.

``HippoStatLogger`` is a vLLM stat logger that lives in process 0 next to vLLM's
own ``LoggingStatLogger`` and ``PrometheusStatLogger``. It reads the snapshots the
worker publishes (:mod:`hippo_vllm.vllm.metrics.export`) and

- at vLLM's log interval prints, like vLLM's "SpecDecoding metrics" line, what
  happened since the last line:
  ``hippo: draft saw 14/128 video tokens (10.9%), 3 views, pruning 1.2 ms/view``
  (plus MAT, tokens per target forward and rounds in parallel mode)
  (plus ``, N without target attention`` when some views lacked s_attn);
- registers a Prometheus collector that reads the snapshots at scrape time, one
  counter per ``EXPORTED_STATS`` row (``vllm:hippo_<field>_total``) with vLLM's
  labels (``model_name``, ``engine``). ``LLM.get_metrics()`` reads the same
  registry.

How it gets next to vLLM's loggers: vLLM's ``vllm.stat_logger_plugins`` entry
points are loaded only by ``AsyncLLM`` (``vllm serve``), not by ``LLMEngine``
(``LLM``), and an installed one turns stats collection on for every ``AsyncLLM``,
hippo or not, even under ``--disable-log-stats``. So instead ``StatLoggerManager``
(which both engines build, only when stats are on) is wrapped to add the hippo
logger after vLLM's own loggers, and only for a hippo configuration (see the patch
index). Adding it last also keeps vLLM's ``PrometheusStatLogger``, which clears
every ``vllm:`` collector when it is built, from removing ours; the next engine's
clears it, as it clears vLLM's own counters.
"""

from __future__ import annotations

import atexit
from collections.abc import Iterator
from typing import Any

from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily
from vllm.v1.metrics.loggers import AggregateStatLoggerBase, StatLoggerManager

from hippo_vllm.logs import get_logger
from hippo_vllm.config import hippo_settings
from hippo_vllm.vllm.metrics.stats import EXPORTED_STATS, metric_name
from hippo_vllm.vllm.patching import patch_attribute
from hippo_vllm.vllm.metrics.export import SnapshotReader, remove_snapshot, snapshot_path

logger = get_logger(__name__)

LABEL_NAMES = ("model_name", "engine")  # PrometheusStatLogger's per-engine labels


def format_log_line(delta: dict[str, float]) -> tuple[str, list[Any]]:
    """The %-format and arguments of the log line for one interval's counter deltas."""
    parts: list[str] = []
    args: list[Any] = []
    views = int(delta["draft_views"])
    if views:
        total, seen = int(delta["video_tokens_total"]), int(delta["video_tokens_seen"])
        parts.append("draft saw %d/%d video tokens")
        args += [seen, total]
        if total:
            parts[-1] += " (%.1f%%)"
            args.append(100.0 * seen / total)
        parts.append("%d views")
        args.append(views)
        parts.append("pruning %.1f ms/view")
        args.append(1000.0 * delta["pruning_seconds"] / views)
        if delta["views_without_target_attention"]:
            parts.append("%d without target attention")
            args.append(int(delta["views_without_target_attention"]))
    if delta.get("target_attention_seconds"):  # the prefills' s_attn, whether or not their views came yet
        parts.append("s_attn capture %.1f ms")
        args.append(1000.0 * delta["target_attention_seconds"])
    forwards = int(delta.get("target_forwards", 0))
    if forwards:
        runs = int(delta["mat_runs"])
        parts.append("MAT (PEARL, +1) %s")
        args.append("%.2f" % (delta["mat_sum"] / runs) if runs else "n/a")
        parts.append("%.2f tokens/target forward")
        args.append(delta["committed_tokens"] / forwards)
        parts.append("rounds %d optimistic / %d conservative")
        args += [int(delta["optimistic_rounds"]), int(delta["conservative_rounds"])]
    failures = int(delta.get("drafting_failures", 0))
    if failures:
        parts.append("%d drafting failures")
        args.append(failures)
    if delta.get("draft_kv_full"):
        parts.append("%d request steps without drafts (draft KV cache full)")
        args.append(int(delta["draft_kv_full"]))
    trips = int(delta.get("draft_round_trips", 0))
    if trips:
        parts.append("draft worker %.1f ms/round trip, target waited %.1f ms/step")
        args += [1000.0 * delta["draft_round_trip_seconds"] / trips, 1000.0 * delta["draft_wait_seconds"] / trips]
    if delta.get("draft_dropped_steps"):
        parts.append("%d steps without drafts (draft worker late or down)")
        args.append(int(delta["draft_dropped_steps"]))
    if delta.get("draft_worker_restarts"):
        parts.append("%d draft worker restarts")
        args.append(int(delta["draft_worker_restarts"]))
    if delta.get("draft_worker_down_seconds"):
        parts.append("drafting off %.1f s (draft worker down)")
        args.append(delta["draft_worker_down_seconds"])
    return "hippo: " + ", ".join(parts), args


class HippoCollector:
    """A Prometheus collector over the engines' snapshots, read at scrape time."""

    def __init__(self, model_name: str, readers: dict[int, SnapshotReader]):
        # vLLM's unregister_vllm_metrics() removes collectors by this attribute when
        # the next engine starts in this process, exactly like vLLM's own metrics.
        self._name = "vllm:hippo"
        self.model_name = model_name
        self.readers = readers

    def _families(self) -> dict[str, CounterMetricFamily]:
        return {
            field: CounterMetricFamily(metric_name(field), description, labels=LABEL_NAMES)
            for field, description in EXPORTED_STATS.items()
        }

    def describe(self) -> Iterator[CounterMetricFamily]:
        # Lets the registry check names without reading any snapshot.
        return iter(self._families().values())

    def collect(self) -> Iterator[CounterMetricFamily]:
        families = self._families()
        for engine, reader in self.readers.items():
            values = reader.read()
            for field, family in families.items():
                family.add_metric([self.model_name, str(engine)], values[field])
        return iter(families.values())


class HippoStatLogger(AggregateStatLoggerBase):
    """vLLM stat logger for hippo's worker-side figures (all engines of one instance)."""

    def __init__(self, vllm_config: Any, engine_indexes: list[int]):
        self.engine_indexes = list(engine_indexes)
        self.readers = {
            idx: SnapshotReader(snapshot_path(vllm_config.instance_id, idx))
            for idx in self.engine_indexes
        }
        self._logged = {idx: dict.fromkeys(EXPORTED_STATS, 0) for idx in self.engine_indexes}
        self.collector = HippoCollector(vllm_config.model_config.served_model_name, self.readers)
        REGISTRY.register(self.collector)
        # A worker that is killed cannot remove its snapshot; process 0 outlives it.
        atexit.register(self.remove_snapshots)

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
        """Nothing to do per step: the figures come from the worker's snapshot."""

    def log_engine_initialized(self) -> None:
        """Nothing to report before the first request."""

    def log(self) -> None:
        for idx, reader in self.readers.items():
            values = reader.read()
            delta = {field: values[field] - self._logged[idx][field] for field in EXPORTED_STATS}
            self._logged[idx] = values
            if all(delta.get(f, 0) <= 0 for f in ("draft_views", "target_forwards", "drafting_failures",
                                                  "draft_round_trips", "draft_dropped_steps")):
                continue  # nothing new in this interval
            fmt, args = format_log_line(delta)
            if len(self.readers) > 1:
                fmt, args = "Engine %03d: " + fmt, [idx, *args]
            logger.info(fmt, *args)

    def remove_snapshots(self) -> None:
        for reader in self.readers.values():
            remove_snapshot(reader.path)


def install() -> None:
    """Wrap ``StatLoggerManager.__init__`` to add the hippo logger (listed in the patch index)."""
    original = StatLoggerManager.__init__

    def __init__(self, vllm_config, *args, **kwargs):
        original(self, vllm_config, *args, **kwargs)
        if hippo_settings(vllm_config) is None:
            return
        try:
            self.stat_loggers.append(HippoStatLogger(vllm_config, self.engine_indexes))
        except Exception:  # metrics must never stop an engine from starting
            logger.exception("hippo: figures will not be logged or exported")

    __init__.__doc__ = original.__doc__
    patch_attribute(StatLoggerManager, "__init__", __init__)
