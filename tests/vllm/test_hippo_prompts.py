"""What the draft sees of different prompts: several videos, images, prefix-cache hits.

Each case is checked, for both schedules, for losslessness against the target
alone, for drafting having happened, and for the draft view hippo built (which
rows of the prompt the draft kept).
"""

from __future__ import annotations

import numpy as np
import pytest
from engine_utils import counter, engine, generate_ids, hippo_config, proposer_of, recording_views, video_request

from hippo_testbed import load_video

pytestmark = pytest.mark.engine

MM_LIMITS = {"image": 1, "video": 2}
SCHEDULES = pytest.mark.parametrize("parallel", [False, True], ids=["serial", "vpsd"])


def chat(tokenizer, parts: list[dict], question: str) -> str:
    messages = [{"role": "user", "content": [*parts, {"type": "text", "text": question}]}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@pytest.fixture(scope="module")
def mixed_media_requests(tiny, tiny_tokenizer):
    videos = [load_video(v, 8) for v in tiny.synthetic_videos[:2]]
    image = np.asarray(videos[0][0][0])  # a 112x112 RGB frame as an image
    return [
        {"prompt": chat(tiny_tokenizer, [{"type": "video"}, {"type": "video"}], "Compare the videos."),
         "multi_modal_data": {"video": videos}},
        {"prompt": chat(tiny_tokenizer, [{"type": "image"}], "Describe the picture."),
         "multi_modal_data": {"image": image}},
    ]


@pytest.fixture(scope="module")
def mixed_media_baseline(tiny, mixed_media_requests):
    """The target alone, same settings: the reference of both schedules."""
    with engine(tiny.target, limit_mm_per_prompt=MM_LIMITS) as llm:
        return generate_ids(llm, mixed_media_requests, max_tokens=20)


@SCHEDULES
def test_each_video_is_pruned_and_images_are_drafted_in_full(parallel, tiny, mixed_media_requests,
                                                             mixed_media_baseline):
    expected = mixed_media_baseline
    config = hippo_config(tiny.draft, parallel=parallel)
    with engine(tiny.target, limit_mm_per_prompt=MM_LIMITS, speculative_config=config) as llm:
        views = recording_views(llm)
        assert generate_ids(llm, mixed_media_requests, max_tokens=20) == expected
        drafted = proposer_of(llm).stats.draft_tokens
    two_videos, image = sorted(views, key=lambda v: -v.video_tokens)
    assert drafted > 0
    # Two 64-token videos, each pruned to ceil(0.1 * 64) = 7 tokens.
    assert (two_videos.video_tokens, two_videos.video_tokens_seen) == (128, 14)
    assert two_videos.compact_len == two_videos.prompt_len - 128 + 14
    assert image.video_tokens == 0
    assert image.keep_rows.tolist() == list(range(image.prompt_len))


@pytest.fixture(scope="module")
def cached_prefix_sequence(tiny, tiny_tokenizer):
    """Three requests one after another, the first twice, and the target alone's outputs."""
    # 16 frames -> 128 video tokens: the prompt spans a full 128-token KV block,
    # which vLLM's prefix cache serves to the next request with the same video.
    video = tiny.synthetic_videos[0]
    first = video_request(tiny_tokenizer, "Describe this video.", video, num_frames=16)
    other_question = video_request(tiny_tokenizer, "What colours move?", video, num_frames=16)
    sequence = [first, first, other_question]
    with engine(tiny.target) as llm:
        return sequence, [generate_ids(llm, [r], max_tokens=20)[0] for r in sequence]


@SCHEDULES
def test_prefix_cache_hits_keep_the_selection_and_stay_lossless(parallel, tiny, cached_prefix_sequence):
    sequence, expected = cached_prefix_sequence
    with engine(tiny.target, speculative_config=hippo_config(tiny.draft, parallel=parallel)) as llm:
        views = recording_views(llm)
        got = [generate_ids(llm, [r], max_tokens=20)[0] for r in sequence]
        stats = proposer_of(llm).stats
        hits = counter(llm, "vllm:prefix_cache_hits")
        drafted = counter(llm, "vllm:spec_decode_num_draft_tokens")
    assert got == expected
    assert hits > 0 and drafted > 0
    # The repeated prompt reuses its view; the new question on the cached video
    # cannot see the target's attention to it and prunes on the visual signals.
    assert views[0].keep_rows.tolist() == views[1].keep_rows.tolist()
    assert stats.views_without_target_attention == 1
    # The repeated prompt reuses the draft's rows too; the new question's view is built from
    # the draft encoder's recent output: the video is encoded once.
    assert stats.draft_encodes == 1
    assert not views[2].attention_used
