"""Helpers for tests that run the real vLLM engine in-process on the tiny fixtures.

The settings keep engines cheap on a CPU: in-process engine (set by conftest
before vLLM is imported), eager mode, a 64 MiB KV cache and small buffers make an
engine start in about 3-4 s instead of 17 s and keep it under 1 GB of memory.
Engines are expensive relative to the tiny models, so tests share one per module
and always shut it down (`engine`), otherwise its memory and worker threads
leak into the next module's engine.
"""

from __future__ import annotations

import contextlib
import gc
from pathlib import Path

ENGINE_DEFAULTS = {
    "dtype": "float32",
    "max_model_len": 1024,
    "max_num_batched_tokens": 1024,
    "max_num_seqs": 4,
    "enforce_eager": True,
    "limit_mm_per_prompt": {"image": 0, "video": 1},
    "seed": 0,
    "disable_log_stats": False,
    "kv_cache_memory_bytes": 64 << 20,
}
NUM_VIDEO_FRAMES = 8  # 8 frames of 112x112 -> grid (4, 8, 8) -> 64 video tokens


def make_llm(model: str | Path, **overrides):
    """An in-process `vllm.LLM` on `model` with the fast test settings (overridable)."""
    from vllm import LLM

    return LLM(model=str(model), **{**ENGINE_DEFAULTS, **overrides})


def shutdown_llm(llm) -> None:
    """Stop the engine core now instead of at garbage collection."""
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


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
    from hippo_vllm.fixtures import text_chat_prompt

    return {"prompt": text_chat_prompt(tokenizer, question)}


def video_request(tokenizer, question: str, video: str | Path, num_frames: int = NUM_VIDEO_FRAMES) -> dict:
    """A chat prompt with one video; the mp4 is decoded like vLLM's OpenCV loader would."""
    from hippo_vllm.fixtures import load_video, video_chat_prompt

    return {
        "prompt": video_chat_prompt(tokenizer, question),
        "multi_modal_data": {"video": load_video(video, num_frames)},
    }


def generate_ids(llm, requests: list[dict], max_tokens: int = 16) -> list[tuple[int, ...]]:
    """Greedy output token ids, one tuple per request, in request order."""
    outputs = llm.generate(requests, greedy(max_tokens), use_tqdm=False)
    return [tuple(o.outputs[0].token_ids) for o in outputs]


def hippo_config(model: str | Path, num_speculative_tokens: int = 3, parallel: bool = False, **overrides) -> dict:
    """A hippo speculative_config; draft-then-verify unless ``parallel``."""
    return {"method": "hippo", "model": str(model), "num_speculative_tokens": num_speculative_tokens,
            "parallel": parallel, **overrides}


def proposer_of(llm):
    """The in-process engine's HippoProposer (in-process engines only)."""
    return llm.llm_engine.model_executor.driver_worker.worker.model_runner.drafter


def counter(llm, name: str) -> float:
    """A counter from ``llm.get_metrics()`` (summed over its label sets)."""
    return sum(m.value for m in llm.get_metrics() if m.name == name)


def recording_views(llm) -> list:
    """Every draft view the proposer builds from now on, in order."""
    stats = proposer_of(llm).stats
    views, record = [], stats.record_view
    stats.record_view = lambda view: (views.append(view), record(view))
    return views
