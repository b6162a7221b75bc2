"""DraftEngine on a Qwen3-VL draft: DeepStack features travel with their prompt rows.

vLLM's Qwen3-VL adds each video row's DeepStack features to the first decoder
layers' outputs, from a buffer its ``embed_input_ids`` fills for the *next*
forward. The draft embeds the whole prompt once and then runs chosen rows in
chunks, so it carries the features in each row instead. Reference: vLLM's own
engine running the same checkpoint (its greedy output, and the exact inputs its
runner used: a placeholder that spans "<t seconds>" text, vision start/end and
video rows, interleaved M-RoPE positions).
"""

from __future__ import annotations

import pytest
import torch
from engine_utils import make_llm, shutdown_llm, text_request, video_request
from test_draft_engine import NUM_TOKENS, _capture_requests, _greedy_decode

from hippo_vllm.vllm.draft.engine import DraftEngine, DraftInput
from hippo_vllm.vllm.draft.prompt_rows import PromptToEmbed
from hippo_vllm.vllm.draft.view import video_embed_rows

pytestmark = pytest.mark.engine

QUESTION = "Describe this video."


@pytest.fixture(scope="module")
def qwen3_vl(tiny, tiny_tokenizer):
    """(DraftEngine on the Qwen3-VL draft, vLLM's video and text references for it)."""
    llm = make_llm(tiny.qwen3_vl_draft)
    try:
        requests = [video_request(tiny_tokenizer, QUESTION, tiny.synthetic_videos[0]),
                    text_request(tiny_tokenizer, QUESTION)]
        video, text = _capture_requests(llm, requests)
        eng = DraftEngine(llm.llm_engine.vllm_config, tiny.qwen3_vl_draft, num_blocks=32, block_size=32)
        yield eng, video, text
    finally:
        shutdown_llm(llm)


def _free_all(eng):
    for rid in eng.kv.req_ids:
        eng.free(rid)


def test_the_placeholder_spans_timestamps_and_vision_tokens_with_is_embed_on_the_video_rows(qwen3_vl, tiny):
    from transformers import AutoTokenizer

    eng, video, _ = qwen3_vl
    (feature,) = video.mm_features
    pos = feature.mm_position
    local = video_embed_rows(pos)
    assert local.numel() == 64 < pos.length  # grid (4, 8, 8) merged by 2: 4 x 16 video rows
    tok = AutoTokenizer.from_pretrained(str(tiny.qwen3_vl_draft))
    span = video.prompt_ids[pos.offset : pos.offset + pos.length]
    text = tok.decode(span[~pos.is_embed.bool()])
    assert text.count("<|vision_start|>") == text.count("<|vision_end|>") == 4
    assert " seconds>" in text
    assert bool((span[local] == tok.convert_tokens_to_ids("<|video_pad|>")).all())
    assert eng.deepstack_levels == 1 and eng.row_width == 2 * eng.hidden_size


def test_full_prompts_reproduce_vllm_greedy_output(qwen3_vl):
    eng, video, text = qwen3_vl
    try:
        for rid, ref in (("v", video), ("t", text)):
            rows = eng.embed_prompt(ref.prompt_ids, ref.mm_features)
            assert rows.shape == (len(ref.prompt_ids), eng.row_width)
            first = eng.run([DraftInput(rid, ref.positions, inputs_embeds=rows)])[0]
            assert _greedy_decode(eng, rid, ref, first, NUM_TOKENS)[0] == ref.output, rid
    finally:
        _free_all(eng)


def test_a_pruned_prompt_keeps_each_rows_deepstack_features_across_chunks(qwen3_vl):
    eng, video, _ = qwen3_vl
    (feature,) = video.mm_features
    pos = feature.mm_position
    rows = eng.embed_prompt(video.prompt_ids, video.mm_features)
    video_rows = pos.offset + video_embed_rows(pos)
    # Only video rows carry DeepStack features; text rows (timestamps included) carry zeros.
    deepstack = rows[:, eng.hidden_size :]
    is_video = torch.zeros(len(video.prompt_ids), dtype=torch.bool)
    is_video[video_rows] = True
    assert bool((deepstack[~is_video] == 0).all()) and bool((deepstack[is_video] != 0).any())

    keep = torch.ones(len(video.prompt_ids), dtype=torch.bool)
    keep[video_rows] = False
    keep[video_rows[1::4]] = True
    pruned, positions = rows[keep], video.positions[:, keep]
    split = int(keep[: int(video_rows[32])].sum())  # a chunk boundary among the kept video rows
    try:
        whole = eng.run([DraftInput("whole", positions, inputs_embeds=pruned)])[0]
        eng.run([DraftInput("chunked", positions[:, :split], inputs_embeds=pruned[:split])])
        chunked = eng.run([DraftInput("chunked", positions[:, split:], inputs_embeds=pruned[split:])])[0]
        torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-4)
        # The features matter: without them the prediction changes.
        flat = pruned.clone()
        flat[:, eng.hidden_size :] = 0
        without = eng.run([DraftInput("without", positions, inputs_embeds=flat)])[0]
        assert (without - whole).abs().max() > 1e-3
        # Nothing is left in vLLM's buffer for a forward that follows.
        assert all(float(b.abs().sum()) == 0 for b in eng.model.deepstack_input_embeds)
    finally:
        _free_all(eng)


def test_prompts_embedded_together_keep_each_rows_deepstack_features(qwen3_vl):
    eng, video, text = qwen3_vl
    (feature,) = video.mm_features
    (item,) = eng.embed_multimodal(video.mm_features)
    pos = feature.mm_position
    kept = torch.cat([torch.arange(pos.offset), pos.offset + video_embed_rows(pos)[::3],
                      torch.arange(pos.offset + pos.length, len(video.prompt_ids))])
    prompts = [PromptToEmbed(text.prompt_ids, [], []), PromptToEmbed(video.prompt_ids, [feature], [item], kept),
               PromptToEmbed(video.prompt_ids, [feature], [item])]
    alone = [eng.embed_prompt(p.token_ids, p.mm_features, p.item_embeds, rows=p.rows) for p in prompts]
    for rows, expected in zip(eng.embed_prompts(prompts), alone):
        assert rows.shape[1] == eng.row_width
        torch.testing.assert_close(rows, expected, rtol=0, atol=0)
    # Nothing is left in vLLM's buffer for a forward that follows.
    assert all(float(b.abs().sum()) == 0 for b in eng.model.deepstack_input_embeds)
