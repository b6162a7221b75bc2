"""HippoConfig: the user-facing keys of ``"method": "hippo"``, validated.

Users write these keys in vLLM's ``--speculative-config`` JSON (or the
``speculative_config`` dict of ``LLM``). Every key is checked here, before any
model is loaded, and a bad one stops start-up with a message naming the key, the
value and what is allowed. Nothing is silently ignored: an unknown key is an
error, because a typo such as ``keep_rato`` would otherwise run a different
experiment than the user asked for.

This module never imports vLLM, so the same validation serves the plugin, the
benchmarks and the unit tests.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from hippo_vllm.core.pruning import PRUNING_METHODS, SELECTION_MODES

METHOD_NAME = "hippo"
ADDITIONAL_CONFIG_KEY = "hippo"  # where the validated settings travel in vLLM's additional_config
SIGNALS = ("attn", "temp", "spa")
PLACEMENTS = ("in_process", "process", "ray")
DRAFT_LENGTHS = ("fixed", "adaptive")


class HippoConfigError(ValueError):
    """A ``hippo`` speculative-config key has a value that is not allowed."""


def _fail(key: str, value: Any, allowed: str) -> HippoConfigError:
    return HippoConfigError(
        f'speculative_config["{key}"]={value!r} is not allowed: {allowed}.'
    )


def _fail_worker(key: str, value: Any, allowed: str) -> HippoConfigError:
    return HippoConfigError(
        f'speculative_config["draft_worker"]["{key}"]={value!r} is not allowed: {allowed}.'
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class HippoConfig:
    """Validated hippo settings; see the README's configuration table."""

    model: str
    num_speculative_tokens: int = 5
    keep_ratio: float = 0.1
    score_weights: Mapping[str, float] = dataclasses.field(
        default_factory=lambda: {"attn": 1.0, "temp": 1.0, "spa": 1.0}
    )
    attn_layers: str | tuple[int, ...] = "all"
    crop_size: int = 5
    selection: str = "global"
    pruning: str = "holistic"
    parallel: bool = False
    draft_length: str = "fixed"
    draft_kv_tokens: int | str = "auto"
    draft_worker: DraftWorkerConfig | Mapping[str, Any] = dataclasses.field(
        default_factory=lambda: DraftWorkerConfig()
    )

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_speculative_config(cls, raw: Mapping[str, Any]) -> HippoConfig:
        """Build from the user's dict (``method`` may be present; it must be hippo)."""
        if not isinstance(raw, Mapping):
            raise HippoConfigError(
                f"speculative_config must be a JSON object, got {type(raw).__name__}."
            )
        # vLLM converts dashes to underscores for its own keys; do the same.
        values = {str(k).replace("-", "_"): v for k, v in raw.items()}
        method = values.pop("method", METHOD_NAME)
        if method != METHOD_NAME:
            raise _fail("method", method, f'this parser handles only "{METHOD_NAME}"')
        unknown = sorted(set(values) - set(cls.keys()))
        if unknown:
            raise HippoConfigError(
                f"Unknown key(s) {unknown} in the hippo speculative_config. "
                f"Allowed keys: {['method', *cls.keys()]}."
            )
        if "model" not in values:
            raise HippoConfigError(
                'speculative_config["model"] is required for method "hippo": '
                "the path or name of a draft checkpoint of the target's model family."
            )
        return cls(**values)

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise _fail("model", self.model, "a non-empty checkpoint path or name")
        k = self.num_speculative_tokens
        # Parallel mode verifies the chunk's first token on the side and the other
        # k - 1 in the next step, so it needs k >= 2; the message names that bound.
        if self.parallel is True and (not _is_int(k) or k < 2):
            raise _fail("num_speculative_tokens", k,
                        'an integer >= 2 with "parallel": true (the chunk\'s first token is verified '
                        "on the side, the other num_speculative_tokens - 1 in the next step), "
                        'or >= 1 with "parallel": false')
        if not _is_int(k) or k < 1:
            raise _fail("num_speculative_tokens", k, "an integer >= 1 (tokens drafted per round)")
        r = self.keep_ratio
        # 0 is allowed on purpose: the draft then sees the prompt's text without any
        # video token (the "no video for the draft" baseline of a pruning study).
        if not _is_number(r) or not (0.0 <= float(r) <= 1.0) or math.isnan(r):
            raise _fail("keep_ratio", r,
                        "a number in [0, 1] (share of video tokens the draft sees; 0 = no video)")
        object.__setattr__(self, "keep_ratio", float(r))
        object.__setattr__(self, "score_weights", self._checked_weights(self.score_weights))
        object.__setattr__(self, "attn_layers", self._checked_layers(self.attn_layers))
        m = self.crop_size
        if not _is_int(m) or m < 3 or m % 2 == 0:
            raise _fail("crop_size", m, "an odd integer >= 3 (the M of the MxM neighbourhood)")
        if self.selection not in SELECTION_MODES:
            raise _fail("selection", self.selection, f"one of {list(SELECTION_MODES)}")
        if self.pruning not in PRUNING_METHODS:
            raise _fail("pruning", self.pruning, f"one of {list(PRUNING_METHODS)}")
        if not isinstance(self.parallel, bool):
            raise _fail("parallel", self.parallel, "true or false")
        t = self.draft_kv_tokens
        if t != "auto" and (not _is_int(t) or t < 1):
            raise _fail(
                "draft_kv_tokens", t,
                '"auto" or an integer >= 1 (tokens the draft\'s KV cache holds, taken from '
                "the KV cache memory)",
            )
        if not isinstance(self.draft_worker, DraftWorkerConfig):
            object.__setattr__(self, "draft_worker", DraftWorkerConfig.from_dict(self.draft_worker))
        self._check_draft_length()

    def _check_draft_length(self) -> None:
        length = self.draft_length
        if length not in DRAFT_LENGTHS:
            raise _fail("draft_length", length, f"one of {list(DRAFT_LENGTHS)}")
        if length == "adaptive" and not (self.parallel and self.draft_worker.remote):
            # The draft drafts until the target's verdict is due: that needs the two
            # running side by side, which only VPSD with a draft of its own does.
            raise _fail("draft_length", length,
                        '"fixed", unless "parallel" is true and "draft_worker" places the draft in a worker '
                        'of its own ("placement": "process" or "ray"); "adaptive" drafts while the target '
                        "verifies, which needs both")

    @staticmethod
    def _checked_weights(weights: Any) -> dict[str, float]:
        allowed = 'an object {"attn": w, "temp": w, "spa": w} of numbers >= 0, not all 0'
        if not isinstance(weights, Mapping):
            raise _fail("score_weights", weights, allowed)
        unknown = sorted(set(weights) - set(SIGNALS))
        if unknown:
            raise _fail("score_weights", dict(weights), f"{allowed}; unknown signal(s) {unknown}")
        checked = {}
        for name in SIGNALS:
            w = weights.get(name, 1.0)
            if not _is_number(w) or not math.isfinite(w) or w < 0:
                raise _fail("score_weights", dict(weights), f"{allowed}; {name}={w!r}")
            checked[name] = float(w)
        if not any(checked.values()):
            raise _fail("score_weights", dict(weights), allowed)
        return checked

    @staticmethod
    def _checked_layers(layers: Any) -> str | tuple[int, ...]:
        allowed = '"all" or a non-empty list of distinct target layer indices >= 0'
        if layers == "all":
            return "all"
        if isinstance(layers, str) or not isinstance(layers, Sequence) or not layers:
            raise _fail("attn_layers", layers, allowed)
        if not all(_is_int(i) and i >= 0 for i in layers) or len(set(layers)) != len(layers):
            raise _fail("attn_layers", layers, allowed)
        return tuple(sorted(layers))

    def resolve_attn_layers(self, num_target_layers: int) -> tuple[int, ...]:
        """The layer indices to capture, checked against the target's depth."""
        if self.attn_layers == "all":
            return tuple(range(num_target_layers))
        too_deep = [i for i in self.attn_layers if i >= num_target_layers]
        if too_deep:
            raise _fail(
                "attn_layers",
                list(self.attn_layers),
                f"indices must be < {num_target_layers}, the target's number of layers "
                f"(out of range: {too_deep})",
            )
        return self.attn_layers

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (vLLM hashes ``additional_config`` into its config key)."""
        d = dataclasses.asdict(self)
        d["score_weights"] = dict(self.score_weights)
        if self.attn_layers != "all":
            d["attn_layers"] = list(self.attn_layers)
        d["draft_worker"] = self.draft_worker.to_dict()
        return d

    @property
    def uses_target_attention(self) -> bool:
        """Whether the draft's views need s_attn from the target's prefill."""
        if self.keep_ratio == 0.0:  # the draft sees no video: nothing to rank
            return False
        if self.pruning in ("attention", "specvlm"):
            return True
        return self.pruning == "holistic" and self.score_weights["attn"] > 0

    @property
    def vllm_num_speculative_tokens(self) -> int:
        """Spec tokens vLLM verifies per step: γ serially, γ−1 in parallel mode."""
        return self.num_speculative_tokens - 1 if self.parallel else self.num_speculative_tokens


# What each key means, for users: the README's configuration tables are rendered from
# these and the dataclasses' fields and defaults (tools/render_readme_tables.py).
KEY_MEANINGS: dict[str, str] = {
    "model": (
        "draft checkpoint of the same family (the target's tokenizer and a vocabulary no larger than the "
        "target's, e.g. Qwen2.5-VL-3B's 151,936 rows for 7B's 152,064; and a vision tower that reads the same "
        "pixels: the family's patch, frame and merge sizes must be the target's)"
    ),
    "num_speculative_tokens": (
        "γ, tokens drafted per round (integer ≥ 1; ≥ 2 with `parallel`); with `draft_length` `adaptive`, "
        "the most a round drafts"
    ),
    "keep_ratio": (
        "share of each video's tokens the draft sees, in [0, 1]; 0: none (the draft drafts from the text "
        "alone, a baseline)"
    ),
    "score_weights": "weights of the three signals; 0 disables one",
    "attn_layers": "target layers whose text→video attention forms s_attn (list of indices)",
    "crop_size": "M of the M×M neighbourhood for s_spa (odd, ≥ 3)",
    "selection": "`global` top-k over the whole video, or `per_frame` quota",
    "pruning": "`holistic`, or a baseline: `attention`, `uniform`, `temporal`, `specvlm`, `none`",
    "parallel": (
        "VPSD's schedule (PEARL rounds); it overlaps drafting with verifying only with the draft on a worker "
        "of its own (`draft_worker`)"
    ),
    "draft_length": (
        "`fixed`: every round drafts γ tokens; `adaptive` (PEARL's; `parallel` with a `draft_worker` of its "
        "own only): each round drafts as many tokens as fit in the target's measured step, 2 to γ "
        "([details](docs/serving.md#adaptive-draft-length))"
    ),
    "draft_kv_tokens": (
        "tokens the draft's own KV cache holds (integer ≥ 1, in whole blocks of 32), or `\"auto\"`: "
        "`max(keep_ratio, 0.25)` of the tokens the target's KV cache holds, at most `max_num_seqs` × "
        "(`max_model_len` + γ + 1). It comes out of the KV cache memory (`gpu_memory_utilization` or "
        "`kv_cache_memory_bytes` covers target and draft); in process, so does the draft's working memory, "
        "measured at start with one dummy encode of the items vLLM's own profiling encodes at once "
        "(its largest items) and one prefill piece "
        "(`max_num_batched_tokens` rows); when it is full, drafting pauses for the requests that do not fit"
    ),
    "draft_worker": (
        "where the draft runs: an object of the keys below "
        "([details](docs/serving.md#the-draft-on-a-worker-of-its-own-draft_worker))"
    ),
}
DRAFT_WORKER_KEY_MEANINGS: dict[str, str] = {
    "placement": (
        "`in_process` (the target's output-rank worker, in sequence with the target), `process` (a worker "
        "process of its own), `ray` (a Ray actor)"
    ),
    "device": (
        "`process`: `\"cpu\"`, or on a GPU machine `\"cuda:N\"`, a GPU the target does not use (required "
        "there); `ray`: null, `\"cpu\"` or `\"cuda\"` (Ray picks the GPU)"
    ),
    "cpu_cores": (
        "CPU core ids the worker's threads are bound to (its thread count); null leaves them where the "
        "worker's parent runs"
    ),
    "timeout_ms": (
        "how long the target waits, after sampling, for a step's drafts before that step goes on without them"
    ),
    "max_restarts": (
        "restarts of a worker that died, stalled or fell behind, within any `restart_window_s`; more is a "
        "crash loop and drafting stays off"
    ),
    "restart_window_s": "the window over which `max_restarts` counts restarts",
    "start_timeout_s": "time allowed to load the draft in a new worker",
}


def hippo_settings(vllm_config: Any) -> HippoConfig | None:
    """The HippoConfig a VllmConfig carries (the config rewrite put it there), or None."""
    extra = getattr(vllm_config, "additional_config", None) or {}
    raw = extra.get(ADDITIONAL_CONFIG_KEY)
    return None if raw is None else HippoConfig(**raw)


@dataclasses.dataclass(frozen=True)
class DraftWorkerConfig:
    """Where the draft runs: the ``draft_worker`` object of the hippo config.

    ``in_process``: in the target's output-rank worker, in sequence with the
    target. ``process``: in a worker process of its own, on ``device``, with its
    threads on ``cpu_cores``; it drafts while the target verifies. ``ray``: the
    same worker as a Ray actor (one GPU on a GPU machine, ``len(cpu_cores)`` or
    one CPU on a CPU machine). A step whose draft answer is not back
    ``timeout_ms`` after the target needs it goes on without drafts; a worker
    that dies or stalls is restarted, at most ``max_restarts`` times within any
    ``restart_window_s`` seconds (a crash loop leaves drafting off; a rare fault
    never does).
    """

    placement: str = "in_process"
    device: str | None = None  # "cpu", "cuda:N" (process), "cuda" (ray: Ray assigns it); None: the target's kind
    cpu_cores: tuple[int, ...] | None = None  # None: the threads stay where the worker's parent runs
    timeout_ms: float = 1000.0
    max_restarts: int = 3  # within any restart_window_s
    restart_window_s: float = 600.0
    start_timeout_s: float = 600.0  # loading the draft in a fresh worker

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, raw: Any) -> DraftWorkerConfig:
        if not isinstance(raw, Mapping):
            raise _fail("draft_worker", raw, f"an object with keys {list(cls.keys())}")
        values = {str(k).replace("-", "_"): v for k, v in raw.items()}
        unknown = sorted(set(values) - set(cls.keys()))
        if unknown:
            raise HippoConfigError(
                f'Unknown key(s) {unknown} in speculative_config["draft_worker"]. '
                f"Allowed keys: {list(cls.keys())}."
            )
        return cls(**values)

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise _fail_worker("placement", self.placement, f"one of {list(PLACEMENTS)}")
        self._check_device()
        cores = self.cpu_cores
        if cores is not None:
            allowed = "null or a non-empty list of distinct CPU core ids >= 0 (the draft worker's threads)"
            if isinstance(cores, str) or not isinstance(cores, Sequence) or not cores:
                raise _fail_worker("cpu_cores", cores, allowed)
            if not all(_is_int(c) and c >= 0 for c in cores) or len(set(cores)) != len(cores):
                raise _fail_worker("cpu_cores", cores, allowed)
            if self.placement == "in_process":
                raise _fail_worker("cpu_cores", cores,
                            'null with "placement": "in_process" (the draft shares the target\'s threads)')
            object.__setattr__(self, "cpu_cores", tuple(cores))
        t = self.timeout_ms
        if not _is_number(t) or not math.isfinite(t) or t <= 0:
            raise _fail_worker("timeout_ms", t,
                        "a number > 0 (how long the target waits for a step's drafts past its own step)")
        object.__setattr__(self, "timeout_ms", float(t))
        if not _is_int(self.max_restarts) or self.max_restarts < 0:
            raise _fail_worker("max_restarts", self.max_restarts,
                        "an integer >= 0 (restarts of a dead or stalled draft worker per restart_window_s)")
        w = self.restart_window_s
        if not _is_number(w) or not math.isfinite(w) or w <= 0:
            raise _fail_worker("restart_window_s", w,
                        "a number > 0 (seconds over which max_restarts counts restarts)")
        object.__setattr__(self, "restart_window_s", float(w))
        s = self.start_timeout_s
        if not _is_number(s) or not math.isfinite(s) or s <= 0:
            raise _fail_worker("start_timeout_s", s, "a number > 0 (seconds to load the draft in a worker)")
        object.__setattr__(self, "start_timeout_s", float(s))

    def _check_device(self) -> None:
        device = self.device
        if device is None:
            return
        if self.placement == "in_process":
            raise _fail_worker("device", device,
                        'null with "placement": "in_process" (the draft runs on the output rank\'s device)')
        if self.placement == "ray":
            if device not in ("cpu", "cuda"):
                raise _fail_worker("device", device,
                            'with "placement": "ray", "cpu" or "cuda" (Ray assigns the GPU)')
            return
        index = device[len("cuda:"):] if isinstance(device, str) and device.startswith("cuda:") else None
        if device != "cpu" and not (index is not None and index.isdigit()):
            raise _fail_worker("device", device,
                        '"cpu" or "cuda:N" (N: a GPU index among the visible ones, not one of the target\'s)')

    @property
    def remote(self) -> bool:
        """Whether the draft runs outside the target's process."""
        return self.placement != "in_process"

    @property
    def timeout_s(self) -> float:
        return self.timeout_ms / 1000.0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if self.cpu_cores is not None:
            d["cpu_cores"] = list(self.cpu_cores)
        return d
