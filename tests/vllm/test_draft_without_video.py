"""keep_ratio 0: the draft drafts from the prompt's text alone, and the outputs stay the target's."""

from __future__ import annotations

import pytest
from engine_utils import counter, engine, generate_ids, hippo_config, proposer_of, recording_views, video_request

pytestmark = pytest.mark.engine


def test_a_draft_without_video_tokens_is_lossless_and_drafts(tiny, tiny_tokenizer):
    requests = [video_request(tiny_tokenizer, question, video)
                for question, video in zip(("Describe this video.", "What moves?"), tiny.synthetic_videos)]
    with engine(tiny.target) as llm:
        expected = generate_ids(llm, requests, max_tokens=20)
    with engine(tiny.target, speculative_config=hippo_config(tiny.draft, keep_ratio=0)) as llm:
        views = recording_views(llm)
        assert generate_ids(llm, requests, max_tokens=20) == expected
        drafted = counter(llm, "vllm:spec_decode_num_draft_tokens")
        capture = proposer_of(llm).capture
    assert drafted > 0
    assert capture is None  # nothing is ranked, so the target's attention is not captured
    assert len(views) == len(requests)
    for view in views:
        assert view.video_tokens == 64 and view.video_tokens_seen == 0
        assert view.compact_len == view.prompt_len - view.video_tokens
