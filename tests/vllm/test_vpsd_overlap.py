"""VPSD issues draft work before the target's forward it can overlap with.

On CUDA the draft's work goes to a side stream, so issuing it before the target's
forward is what lets the two run at once; on CPU the same calls run in order, which
is what this test observes: the draft's vision encoding is issued before the
target's prefill forward (only the compact prefill waits for s_attn), and each
decode step's chunk before that step's target forward.
"""

from __future__ import annotations

import pytest
from engine_utils import engine, generate_ids, hippo_config, proposer_of, video_request

pytestmark = pytest.mark.engine


def record_calls(obj, name: str, label: str, events: list[str]) -> None:
    original = getattr(obj, name)

    def wrapper(*args, **kwargs):
        events.append(label)
        return original(*args, **kwargs)

    setattr(obj, name, wrapper)


def test_draft_work_is_issued_before_the_target_forward_it_overlaps(tiny, tiny_tokenizer):
    request = video_request(tiny_tokenizer, "Describe this video.", tiny.synthetic_videos[0])
    with engine(tiny.target) as llm:
        expected = generate_ids(llm, [request], max_tokens=12)
    with engine(tiny.target, speculative_config=hippo_config(tiny.draft, parallel=True)) as llm:
        proposer = proposer_of(llm)
        runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
        events: list[str] = []
        record_calls(proposer.engine, "embed_multimodal", "draft vision", events)
        record_calls(proposer.chunks, "_draft", "draft chunk", events)
        record_calls(runner.model, "forward", "target forward", events)
        assert generate_ids(llm, [request], max_tokens=12) == expected
    assert events[:2] == ["draft vision", "target forward"]
    assert events.count("draft vision") == 1  # the compact prefill reused it
    decode_steps = events[2:]
    chunks = [i for i, event in enumerate(decode_steps) if event == "draft chunk"]
    assert chunks, events
    assert all(decode_steps[i + 1] == "target forward" for i in chunks), events
