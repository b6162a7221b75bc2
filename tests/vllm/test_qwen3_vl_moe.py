"""Qwen3-VL MoE served by the real engine: drafted by the dense Qwen3-VL draft, and by itself.

The MoE target's decoder MLPs are sparse blocks (4 experts, 2 routed per token, run by
vLLM's fused-MoE CPU kernel); its processor, interleaved M-RoPE and DeepStack are
Qwen3-VL's, so the dense Qwen3-VL draft drafts for it. Each engine runs three batches
(text only, video only, mixed), each compared with the MoE target alone on the same batch.
"""

from __future__ import annotations

import pytest
import torch

from engine_utils import (
    ENGINE_DEFAULTS,
    counter,
    engine,
    generate_ids,
    hippo_config,
    product_default,
    proposer_of,
    text_request,
    video_request,
)

K = 3
MAX_TOKENS = 24
QUESTIONS = ("Describe this video.", "What moves in the video?")
VIDEO_REQUESTS = 3  # two in the video batch, one in the mixed batch
VIDEO_TOKENS = 64  # per request: grid (4, 8, 8) merged by 2


@pytest.fixture(scope="module")
def batches(tiny, tiny_tokenizer):
    # One video per request, none seen twice: a video's rows cached by the target's
    # prefix cache would be prefilled without the target's s_attn.
    videos = tiny.synthetic_videos
    text = [text_request(tiny_tokenizer, q) for q in QUESTIONS]
    video = [video_request(tiny_tokenizer, QUESTIONS[i], videos[i]) for i in range(2)]
    mixed = [video_request(tiny_tokenizer, QUESTIONS[0], videos[2]), text_request(tiny_tokenizer, QUESTIONS[1])]
    return {"text": text, "video": video, "mixed": mixed}


def _generate_all(llm, batches) -> dict[str, list[tuple[int, ...]]]:
    return {name: generate_ids(llm, reqs, max_tokens=MAX_TOKENS) for name, reqs in batches.items()}


@pytest.fixture(scope="module")
def baseline(tiny, batches):
    with engine(tiny.qwen3_vl_moe_target) as llm:
        ids = _generate_all(llm, batches)
    # Each prompt of a batch gets its own output, so a draft fed the wrong video rows,
    # positions or DeepStack features cannot match them by luck.
    for name, outputs in ids.items():
        assert len(set(outputs)) == len(outputs), name
    return ids


def _drafted_and_accepted(llm) -> tuple[float, float]:
    return (counter(llm, "vllm:spec_decode_num_draft_tokens"),
            counter(llm, "vllm:spec_decode_num_accepted_tokens"))


@pytest.mark.engine
@pytest.mark.skipif(ENGINE_DEFAULTS["dtype"] != "float32", reason="compared with transformers in float32")
def test_vllm_runs_the_moe_target_as_transformers_does(tiny, tiny_tokenizer, batches, baseline):
    # vLLM reads the fused expert tensors in the published layout; read the wrong way
    # round they would route or mix the experts differently from transformers.
    from transformers import Qwen3VLMoeForConditionalGeneration

    model = Qwen3VLMoeForConditionalGeneration.from_pretrained(str(tiny.qwen3_vl_moe_target), dtype=torch.float32)
    ids = tiny_tokenizer(batches["text"][0]["prompt"], return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.eval().generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False)
    assert tuple(out[0, ids.shape[1]:].tolist()) == baseline["text"][0]


@pytest.mark.engine
def test_a_pruned_dense_draft_is_lossless_for_the_moe_target(tiny, batches, baseline):
    # The product's default schedule, batch by batch with the target's attention checked
    # for every view; both schedules run the whole script in test_family_matrix.py.
    config = hippo_config(tiny.qwen3_vl_draft, K, parallel=product_default("parallel"), keep_ratio=0.25)
    with engine(tiny.qwen3_vl_moe_target, speculative_config=config) as llm:
        drafted_before = 0.0
        for name, reqs in batches.items():
            assert generate_ids(llm, reqs, max_tokens=MAX_TOKENS) == baseline[name], name
            drafted, _ = _drafted_and_accepted(llm)
            assert drafted > drafted_before, f"nothing drafted in the {name} batch"
            drafted_before = drafted
        stats = proposer_of(llm).stats
    assert stats.video_tokens_total == VIDEO_REQUESTS * VIDEO_TOKENS
    assert stats.video_tokens_seen == VIDEO_REQUESTS * VIDEO_TOKENS // 4
    # The MoE target's s_attn (over each whole placeholder) ranked the video rows.
    assert stats.views_without_target_attention == 0


@pytest.mark.engine
def test_the_moe_target_drafting_for_itself_keeping_every_token_accepts_everything(tiny, batches, baseline):
    config = hippo_config(tiny.qwen3_vl_moe_target, K, parallel=False, keep_ratio=1.0)
    with engine(tiny.qwen3_vl_moe_target, speculative_config=config) as llm:
        assert _generate_all(llm, batches) == baseline
        drafted, accepted = _drafted_and_accepted(llm)
        stats = proposer_of(llm).stats
    assert drafted > 0 and accepted / drafted >= 0.99, (drafted, accepted)
    assert stats.video_tokens_seen == stats.video_tokens_total == VIDEO_REQUESTS * VIDEO_TOKENS
