"""The rows ``bench_e2e.py`` runs: each a configuration of the engine (``Config``).

The target alone; vLLM's ``draft_model`` with the text-only draft; hippo
draft-then-verify and VPSD for each draft pair (``PAIRS``); and, with a worker, the
rows bound to CPU cores: the target alone and draft-then-verify on the target's core,
VPSD with the draft in a worker process on the other core, with chunks of γ and with
PEARL's adaptive length.
"""

from __future__ import annotations

import dataclasses
import pathlib

KEEP_RATIO = 0.1
# name -> (the draft: the family's "target" or its "draft", keep_ratio)
PAIRS = {"self": ("target", KEEP_RATIO), "self-keep-all": ("target", 1.0), "tiny": ("draft", KEEP_RATIO)}


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    method: str  # "target", "draft_model" or "hippo"
    speculative_config: dict | None = None
    pair: str | None = None
    cores: frozenset[int] | None = None  # the CPU cores the target's threads are bound to (None: all)

    @property
    def worker(self) -> bool:
        """The draft runs in a worker process of its own."""
        return bool(self.speculative_config and "draft_worker" in self.speculative_config)

    @property
    def parallel(self) -> bool:
        return bool(self.speculative_config and self.speculative_config.get("parallel"))


TARGET_CORE, DRAFT_CORE = 0, 1  # the worker rows: the target's threads on core 0, the draft's on core 1


def build_configs(models: dict[str, pathlib.Path], pairs: list[str], k: int, worker: bool,
                  draft_model: bool = True, adaptive_cap: int = 8) -> list[Config]:
    """``models``: the "target", "draft" and "text_draft" checkpoints the rows run."""
    configs = [Config("target", "target")]
    if draft_model:
        spec = {"method": "draft_model", "model": str(models["text_draft"]), "num_speculative_tokens": k}
        configs.append(Config("draft_model text", "draft_model", spec))
    for pair in pairs:
        role, keep_ratio = PAIRS[pair]
        for parallel in (False, True):
            spec = {"method": "hippo", "model": str(models[role]), "num_speculative_tokens": k,
                    "keep_ratio": keep_ratio, "parallel": parallel}
            schedule = "parallel" if parallel else "serial"
            configs.append(Config(f"hippo {schedule} {pair}", "hippo", spec, pair))
    if worker:
        configs.append(Config("target core0", "target", cores=frozenset({TARGET_CORE})))
        for pair in pairs:
            role, keep_ratio = PAIRS[pair]
            # Draft-then-verify on the target's core alone: what the target's own device does
            # without a second one for the draft.
            serial = {"method": "hippo", "model": str(models[role]), "num_speculative_tokens": k,
                      "keep_ratio": keep_ratio, "parallel": False}
            configs.append(Config(f"hippo serial {pair} core0", "hippo", serial, pair,
                                  cores=frozenset({TARGET_CORE})))
            spec = {**serial, "parallel": True,
                    "draft_worker": {"placement": "process", "cpu_cores": [DRAFT_CORE]}}
            configs.append(Config(f"hippo parallel {pair} worker", "hippo", spec, pair,
                                  cores=frozenset({TARGET_CORE})))
            adaptive = {**spec, "draft_length": "adaptive", "num_speculative_tokens": adaptive_cap}
            configs.append(Config(f"hippo parallel {pair} worker adaptive", "hippo", adaptive, pair,
                                  cores=frozenset({TARGET_CORE})))
    return configs
