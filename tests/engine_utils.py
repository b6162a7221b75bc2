"""Helpers for tests that run the real vLLM engine in-process on the tiny fixtures.

Two profiles, chosen by the environment variable HIPPO_TEST_PROFILE:

- ``cpu`` (default): settings that keep engines cheap on a CPU: in-process engine
  (set by conftest before vLLM is imported), float32, eager mode, a 64 MiB KV cache
  and small buffers make an engine start in about 3-4 s instead of 17 s and keep it
  under 1 GB of memory. Tests parametrized over ``numeric_variants()`` also run in
  bfloat16 and with torch.compile.
- ``gpu``: what a GPU user runs (``make gpu-check``): bfloat16, torch.compile and CUDA
  graphs on, vLLM's own KV-cache sizing and attention backend, tensor parallelism
  from HIPPO_TEST_TP (default 1).

HIPPO_TEST_DTYPE overrides the profile's dtype.

Engines are expensive relative to the tiny models, so tests share one per module
and always shut it down (`engine`), otherwise its memory and worker threads
leak into the next module's engine.
"""

from __future__ import annotations

import contextlib
import gc
import os
from pathlib import Path

PROFILES = ("cpu", "gpu")
PROFILE = os.environ.get("HIPPO_TEST_PROFILE", "cpu")
if PROFILE not in PROFILES:
    raise ValueError(f"HIPPO_TEST_PROFILE={PROFILE!r} is not a test profile; allowed: {', '.join(PROFILES)}")
TENSOR_PARALLEL = int(os.environ.get("HIPPO_TEST_TP", "1"))

_COMMON = {
    "max_model_len": 1024,
    "max_num_batched_tokens": 1024,
    "max_num_seqs": 4,
    "limit_mm_per_prompt": {"image": 0, "video": 1},
    "seed": 0,
    "disable_log_stats": False,
}
CPU_DEFAULTS = {**_COMMON, "dtype": "float32", "enforce_eager": True, "kv_cache_memory_bytes": 64 << 20}
GPU_DEFAULTS = {
    **_COMMON,
    "dtype": "bfloat16",
    "enforce_eager": False,  # torch.compile and CUDA graphs, as `vllm serve` runs by default
    # No KV-cache size override: vLLM sizes it from profiling. A pytest process starts
    # engines one after another; 0.4 of the memory leaves room for what a previous
    # engine's allocator still holds, which vLLM's free-memory check at start counts.
    "gpu_memory_utilization": 0.4,
    "tensor_parallel_size": TENSOR_PARALLEL,
}
ENGINE_DEFAULTS = GPU_DEFAULTS if PROFILE == "gpu" else CPU_DEFAULTS
if "HIPPO_TEST_DTYPE" in os.environ:  # e.g. float32 on a GPU, to tell a bfloat16 near-tie from a bug
    ENGINE_DEFAULTS = {**ENGINE_DEFAULTS, "dtype": os.environ["HIPPO_TEST_DTYPE"]}

# Numeric settings that lossless, sampling and metrics tests also run in (cpu profile):
# what a GPU user runs differs from the fast float32 eager engine in dtype and in
# torch.compile, and either can change which kernels compute the logits.
VARIANTS = {
    "fp32": {},  # the profile's own settings: float32 on the CPU profile
    "bf16": {"dtype": "bfloat16"},
    "bf16-compiled": {"dtype": "bfloat16", "enforce_eager": False},
}


def numeric_variants(*names: str) -> list:
    """pytest params of (id, engine overrides) for ``names``; under the gpu profile just its own settings."""
    import pytest

    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown numeric variants {unknown}; allowed: {sorted(VARIANTS)}")
    if PROFILE == "gpu":
        return [pytest.param({}, id="gpu")]
    return [pytest.param(VARIANTS[name], id=name) for name in names]


def schedule_matrix(both: tuple[str, ...], default_only: tuple[str, ...] = ()) -> list:
    """pytest params (parallel, engine overrides): both schedules in the ``both`` variants,
    only the product's default schedule in the ``default_only`` ones (gpu profile: both
    schedules with its own settings)."""
    import pytest

    default = product_default("parallel")
    matrix = []
    for variant in numeric_variants(*both, *default_only):
        for parallel, schedule in ((False, "serial"), (True, "vpsd")):
            if variant.id not in default_only or parallel == default:
                matrix.append(pytest.param(parallel, *variant.values, id=f"{schedule}-{variant.id}"))
    return matrix


def serve_args(media_dir: str | Path, **kwargs) -> list[str]:
    """The test profile's `vllm serve` flags (examples/server_process.py must be importable)."""
    from server_process import fast_cpu_serve_args, gpu_serve_args

    if PROFILE == "gpu":
        return gpu_serve_args(media_dir, tensor_parallel_size=TENSOR_PARALLEL, **kwargs)
    return fast_cpu_serve_args(media_dir, **kwargs)


def product_default(key: str):
    """The default of a hippo config key, e.g. ``product_default("parallel")`` (the schedule users get)."""
    import dataclasses

    from hippo_vllm.config import HippoConfig

    fields = {field.name: field for field in dataclasses.fields(HippoConfig)}
    if key not in fields or fields[key].default is dataclasses.MISSING:
        raise KeyError(f"{key!r} is not a hippo config key with a default")
    return fields[key].default


NUM_VIDEO_FRAMES = 8  # 8 frames of 112x112 -> grid (4, 8, 8) -> 64 video tokens


def make_llm(model: str | Path, **overrides):
    """An in-process `vllm.LLM` on `model` with the fast test settings (overridable)."""
    from vllm import LLM

    settings = {**ENGINE_DEFAULTS, **overrides}
    with query_length_invariant_attention(settings.get("dtype")):
        return LLM(model=str(model), **settings)


@contextlib.contextmanager
def query_length_invariant_attention(dtype: str | None):
    """Build a bfloat16 engine on vLLM's "vec" CPU attention kernel where the CPU has AMX tiles.

    With AMX, vLLM's CPU attention picks its "amx" kernel for bfloat16
    (``vllm/v1/attention/backends/cpu_attn.py``, ``_get_attn_isa``), whose results depend
    on how many query rows a step holds: a step verifying k+1 tokens can then pick
    another greedy token than the target alone decoding one row at a time, with no
    speculation at fault (the lossless bf16 tests fail there on any commit, and pass
    with the "vec" kernel). The lossless tests compare token for token, so their
    bfloat16 engines, baselines included, take the "vec" kernel; the kernel is chosen
    when the engine is built, so the switch lasts only while it is built.
    """
    import torch

    if dtype != "bfloat16" or PROFILE == "gpu" or not torch.cpu._is_amx_tile_supported():
        yield
        return
    original = torch.cpu._is_amx_tile_supported
    torch.cpu._is_amx_tile_supported = lambda: False
    try:
        yield
    finally:
        torch.cpu._is_amx_tile_supported = original


def shutdown_llm(llm) -> None:
    """Stop the engine core now instead of at garbage collection."""
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    if PROFILE == "gpu":
        # Release this engine's GPU memory and process groups before the next one starts.
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()


@contextlib.contextmanager
def engine(model: str | Path, **overrides):
    llm = make_llm(model, **overrides)
    try:
        yield llm
    finally:
        shutdown_llm(llm)


def greedy(max_tokens: int = 16):
    """Deterministic sampling that never stops early, so every output has max_tokens ids."""
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def text_request(tokenizer, question: str) -> dict:
    from hippo_testbed import text_chat_prompt

    return {"prompt": text_chat_prompt(tokenizer, question)}


def video_request(tokenizer, question: str, video: str | Path, num_frames: int = NUM_VIDEO_FRAMES) -> dict:
    """A chat prompt with one video; the mp4 is decoded like vLLM's OpenCV loader would."""
    from hippo_testbed import load_video, video_chat_prompt

    return {
        "prompt": video_chat_prompt(tokenizer, question),
        "multi_modal_data": {"video": load_video(video, num_frames)},
    }


def generate_ids(llm, requests: list[dict], max_tokens: int = 16) -> list[tuple[int, ...]]:
    """Greedy output token ids, one tuple per request, in request order."""
    outputs = llm.generate(requests, greedy(max_tokens), use_tqdm=False)
    return [tuple(o.outputs[0].token_ids) for o in outputs]


def hippo_config(model: str | Path, num_speculative_tokens: int = 3, parallel: bool | None = None,
                 **overrides) -> dict:
    """A hippo speculative_config; the product's default schedule unless ``parallel`` is given."""
    schedule = {} if parallel is None else {"parallel": parallel}
    return {"method": "hippo", "model": str(model), "num_speculative_tokens": num_speculative_tokens,
            **schedule, **overrides}


def proposer_of(llm):
    """The in-process engine's HippoProposer (in-process engines with one worker only)."""
    return llm.llm_engine.model_executor.driver_worker.worker.model_runner.drafter


def draft_worker_of(llm):
    """The in-process engine's DraftWorker: the draft's side, in the target's process."""
    return proposer_of(llm).draft.worker


def counter(llm, name: str) -> float:
    """A counter from ``llm.get_metrics()`` (summed over its label sets)."""
    return sum(m.value for m in llm.get_metrics() if m.name == name)


def recording_views(llm) -> list:
    """Every draft view the proposer builds from now on, in order."""
    stats = proposer_of(llm).stats
    views, record = [], stats.record_view
    stats.record_view = lambda view: (views.append(view), record(view))
    return views
