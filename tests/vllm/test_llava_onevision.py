"""LLaVA-OneVision: its video layout (pooled frames, one newline row), 1-D positions, served losslessly.

The pure checks run on configs and synthetic features; the engine tests run the
real vLLM engine in-process on the tiny LLaVA-OneVision checkpoints with real mp4s.
"""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from engine_utils import (
    counter,
    draft_worker_of,
    engine,
    generate_ids,
    hippo_config,
    product_default,
    proposer_of,
    text_request,
    video_request,
)
from hippo_vllm.config import HippoConfig, HippoConfigError
from hippo_vllm.core import VideoGrid
from hippo_vllm.vllm.draft.draft_input import DraftInput
from hippo_vllm.vllm.seam.config_rewrite import check_draft_against_target
from hippo_vllm.vllm.draft.view import build_draft_view
from hippo_vllm.vllm.model_families import LLAVA_ONEVISION, QWEN2_5_VL, family_of

QUESTIONS = ("Describe this video.", "What moves in the video?")
FRAMES = 8
FRAME_TOKENS = 16  # 112x112 frames, 14-pixel patches: 8x8 features pooled to 4x4
VIDEO_TOKENS = FRAMES * FRAME_TOKENS  # the newline row after them is not a video token


@pytest.fixture(scope="module")
def llava():
    from hippo_testbed.llava_onevision import build_llava_onevision

    return build_llava_onevision()


@pytest.fixture(scope="module")
def llava_tokenizer(llava):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(llava.target))


def _hf_config(path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(path))


def test_both_checkpoints_are_llava_onevision(llava):
    assert family_of(_hf_config(llava.target)) == LLAVA_ONEVISION
    assert family_of(_hf_config(llava.draft)) == LLAVA_ONEVISION


def test_the_fixture_processor_lays_a_video_out_as_pooled_frames_and_a_newline(tiny, llava, llava_tokenizer):
    from transformers import AutoProcessor

    from hippo_testbed import load_video, video_chat_prompt

    processor = AutoProcessor.from_pretrained(str(llava.target))
    frames, _ = load_video(tiny.synthetic_videos[0], FRAMES)
    prompt = video_chat_prompt(llava_tokenizer, QUESTIONS[0])
    assert prompt.startswith("<|im_start|>user\n<video>\nDescribe this video.<|im_end|>\n")
    out = processor(text=prompt, videos=[frames], return_tensors="pt")
    assert tuple(out["pixel_values_videos"].shape) == (1, FRAMES, 3, 112, 112)
    video_id = llava_tokenizer.convert_tokens_to_ids("<video>")
    assert int((out["input_ids"] == video_id).sum()) == VIDEO_TOKENS + 1


def test_the_video_grid_is_frames_by_the_pooled_feature_square(llava):
    feature = SimpleNamespace(data={"pixel_values_videos": SimpleNamespace(data=torch.zeros(FRAMES, 3, 112, 112))})
    assert LLAVA_ONEVISION.video_grid(feature, _hf_config(llava.target)) == VideoGrid(FRAMES, 4, 4)
    # A 384-pixel tower of 14-pixel patches (the released checkpoints): 27 features a side pool to 14.
    hf = SimpleNamespace(vision_config=SimpleNamespace(image_size=384, patch_size=14))
    assert LLAVA_ONEVISION.video_grid(feature, hf) == VideoGrid(FRAMES, 14, 14)


def test_the_newline_row_after_a_video_is_always_kept_and_never_scored():
    offset, frame_rows = 5, 8
    length = frame_rows + 1  # the newline row last
    feature = SimpleNamespace(modality="video", mm_position=SimpleNamespace(offset=offset, length=length,
                                                                           is_embed=None))
    prompt_len = offset + length + 4
    newline = offset + length - 1
    grid = lambda f: VideoGrid(2, 2, 2)  # noqa: E731
    embeds = torch.randn(length, 16)  # the draft's encoder output includes the newline embedding
    view = build_draft_view(HippoConfig(model="draft", keep_ratio=0.5, pruning="uniform"), prompt_len, [feature],
                            [embeds], None, grid, video_newlines=1)
    kept = set(view.keep_rows.tolist())
    frames = set(range(offset, offset + frame_rows))
    assert kept - frames == set(range(prompt_len)) - frames  # text and the newline row
    assert len(kept & frames) == 4
    assert (view.video_tokens, view.video_tokens_seen) == (8, 4)

    # s_attn covers the whole placeholder; the newline row scores highest but is no candidate.
    attn = torch.zeros(length)
    favoured = torch.tensor([0, 3, 4, 6])
    attn[favoured] = 1.0
    attn[-1] = 5.0
    view = build_draft_view(HippoConfig(model="draft", keep_ratio=0.5, pruning="attention"), prompt_len, [feature],
                            [embeds], [attn], grid, video_newlines=1)
    assert set(view.keep_rows.tolist()) & frames == set((offset + favoured).tolist())
    assert newline in set(view.keep_rows.tolist())

    # Without the newline count the frame rows and the grid disagree: refused, naming both.
    with pytest.raises(ValueError, match=r"9 video rows in its 9-row placeholder \(0 newline rows after them\), "
                                         r"grid VideoGrid\(t=2, h=2, w=2\)"):
        build_draft_view(HippoConfig(model="draft", keep_ratio=0.5, pruning="uniform"), prompt_len, [feature],
                         [embeds], None, grid)


def _check(target, draft) -> None:
    target_model_config = SimpleNamespace(model=str(target), hf_config=_hf_config(target), trust_remote_code=False,
                                          tokenizer=str(target), tokenizer_revision=None)
    check_draft_against_target(HippoConfig(model=str(draft)), target_model_config)


def test_a_llava_onevision_draft_for_a_qwen_target_and_the_reverse_are_refused(tiny, llava):
    assert family_of(_hf_config(tiny.target)) == QWEN2_5_VL
    with pytest.raises(HippoConfigError, match=r"'.*/draft' is a LlavaOnevisionForConditionalGeneration "
                                               r"\(LLaVA-OneVision family\), the target '.*/target' a "
                                               r"Qwen2_5_VLForConditionalGeneration \(Qwen2.5-VL family\); "
                                               r"the draft must be of the target's family "
                                               r"\(Qwen2_5_VLForConditionalGeneration\)"):
        _check(tiny.target, llava.draft)
    with pytest.raises(HippoConfigError, match=r"'.*/draft' is a Qwen2_5_VLForConditionalGeneration "
                                               r"\(Qwen2.5-VL family\), the target '.*/target' a "
                                               r"LlavaOnevisionForConditionalGeneration \(LLaVA-OneVision family\); "
                                               r"the draft must be of the target's family "
                                               r"\(LlavaOnevisionForConditionalGeneration\)"):
        _check(llava.target, tiny.draft)
    _check(llava.target, llava.draft)  # the pair itself is accepted


def test_a_llava_onevision_draft_whose_tower_reads_other_frames_is_refused(llava, tmp_path):
    draft = tmp_path / "draft"
    shutil.copytree(llava.draft, draft)
    cfg = json.loads((draft / "config.json").read_text())
    cfg["vision_config"]["image_size"] = 2 * cfg["vision_config"]["image_size"]
    (draft / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HippoConfigError, match=r"'.*/draft' has vision_config.image_size=224, the target "
                                               r"'.*/target' 112; the draft's vision tower reads the target's "
                                               r"processor outputs, so for the LLaVA-OneVision family "
                                               r"image_size, patch_size must be the target's"):
        _check(llava.target, draft)


def test_a_llava_onevision_model_pooling_frames_otherwise_is_refused(llava, tmp_path):
    target = tmp_path / "target"
    shutil.copytree(llava.target, target)
    cfg = json.loads((target / "config.json").read_text())
    cfg["spatial_pool_stride"] = 3
    (target / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HippoConfigError, match=r"the target model '.*/target' is a LlavaOnevisionForConditionalGeneration "
                                               r"\(LLaVA-OneVision family\), but its spatial_pool_stride is 3, where "
                                               r"vLLM pools video frames with spatial_pool_stride 2: hippo's "
                                               r"LLaVA-OneVision adapter does not know this model's video layout"):
        _check(target, llava.draft)


# -- served by the real engine --------------------------------------------------------------

K = 3


@pytest.fixture(scope="module")
def requests(tiny, llava_tokenizer):
    """Three video prompts and a text prompt, served as one mixed batch."""
    videos = tiny.synthetic_videos
    reqs = [video_request(llava_tokenizer, QUESTIONS[i % 2], videos[i], FRAMES) for i in range(3)]
    return reqs + [text_request(llava_tokenizer, QUESTIONS[0])]


@pytest.fixture(scope="module")
def baseline(llava, requests):
    with engine(llava.target) as llm:
        ids = generate_ids(llm, requests, max_tokens=24)
    # Each prompt gets its own output, so a draft fed the wrong rows or positions
    # cannot match them by luck.
    assert len(set(ids)) == len(ids)
    return ids


def spec_counters(llm) -> tuple[float, float]:
    return (counter(llm, "vllm:spec_decode_num_draft_tokens"),
            counter(llm, "vllm:spec_decode_num_accepted_tokens"))


@pytest.mark.engine
def test_self_draft_keeping_every_token_is_lossless_and_accepts_everything(llava, requests, baseline):
    config = hippo_config(llava.target, K, parallel=False, keep_ratio=1.0)
    with engine(llava.target, speculative_config=config) as llm:
        assert generate_ids(llm, requests, max_tokens=24) == baseline
        drafted, accepted = spec_counters(llm)
        stats = proposer_of(llm).stats
    # The newline row sits at its own 1-D position in the draft too: with every row
    # kept, draft and target compute the same thing.
    assert drafted > 0 and accepted / drafted >= 0.99, (drafted, accepted)
    assert stats.video_tokens_seen == stats.video_tokens_total == 3 * VIDEO_TOKENS


def recording_draft_inputs(llm) -> tuple[dict, list, list]:
    """From now on: each request's draft view, every input the draft runs (a chunk's token
    rows as DraftInputs too, its later steps' with the tokens they fed), and the positions
    tensor its model gets in each forward."""
    worker = draft_worker_of(llm)
    views, inputs, model_positions = {}, [], []
    engine = worker.engine
    build_new, run, run_tokens, forward = worker.views.build_new, engine.run, engine.run_tokens, engine.model.forward
    run_greedy = engine.run_greedy

    def recording_build_new(requests):  # every new view, built alone or with a step's others
        built = build_new(requests)
        views.update((request[0], view) for request, view in zip(requests, built))
        return built

    def recording_run(batch):
        inputs.extend(batch)
        return run(batch)

    def record_token_rows(req_ids, query_lens, token_ids, positions):  # a chunk's step, as inputs
        rows = zip(req_ids, token_ids.cpu().split(query_lens), positions.cpu().split(query_lens))
        inputs.extend(DraftInput(req_id, pos.expand(3, -1), token_ids=ids) for req_id, ids, pos in rows)

    def recording_run_tokens(req_ids, query_lens, token_ids, positions):
        record_token_rows(req_ids, query_lens, token_ids, positions)
        return run_tokens(req_ids, query_lens, token_ids, positions)

    def recording_run_greedy(req_ids, query_lens, token_ids, positions, steps):  # a whole chunk, as inputs
        drafted = run_greedy(req_ids, query_lens, token_ids, positions, steps)
        record_token_rows(req_ids, query_lens, token_ids, positions)  # its first step
        lasts = torch.tensor(query_lens).cumsum(0) - 1
        for req_id, fed, after in zip(req_ids, drafted.cpu()[:, :-1], positions.cpu()[lasts] + 1):
            inputs.extend(DraftInput(req_id, (after + step).reshape(1, 1).expand(3, -1), token_ids=fed[step:step + 1])
                          for step in range(steps - 1))  # later step s feeds the argmax of the step before
        return drafted

    def recording_forward(*args, positions, **kwargs):
        model_positions.append(positions)
        return forward(*args, positions=positions, **kwargs)

    worker.views.build_new, engine.run, engine.run_tokens = recording_build_new, recording_run, recording_run_tokens
    engine.run_greedy = recording_run_greedy
    engine.model.forward = recording_forward
    return views, inputs, model_positions


@pytest.mark.engine
def test_pruned_draft_is_lossless_and_runs_each_kept_row_at_its_position(llava, llava_tokenizer, requests, baseline):
    # The product's default schedule; both schedules run the whole script in test_family_matrix.py.
    config = hippo_config(llava.draft, K, parallel=product_default("parallel"), keep_ratio=0.25)
    with engine(llava.target, speculative_config=config) as llm:
        views, inputs, model_positions = recording_draft_inputs(llm)
        assert generate_ids(llm, requests, max_tokens=24) == baseline
        drafted, _ = spec_counters(llm)
        stats = proposer_of(llm).stats
    assert drafted > 0
    assert stats.video_tokens_total == 3 * VIDEO_TOKENS
    assert stats.video_tokens_seen == 3 * VIDEO_TOKENS // 4
    # The target's s_attn (over each whole placeholder) ranked the frame tokens.
    assert stats.views_without_target_attention == 0
    # Every video prompt starts "<|im_start|>user\n<video>\n": its placeholder (the
    # frame tokens, then the newline row) begins where the one <video> token was.
    offset = llava_tokenizer(requests[0]["prompt"])["input_ids"].index(llava_tokenizer.convert_tokens_to_ids("<video>"))
    frames, newline = set(range(offset, offset + VIDEO_TOKENS)), offset + VIDEO_TOKENS
    video_views = {req_id: v for req_id, v in views.items() if v.video_tokens}
    assert len(video_views) == 3
    for req_id, view in video_views.items():
        kept = set(view.keep_rows.tolist())
        assert kept - frames == set(range(view.prompt_len)) - frames  # text and the newline row
        assert newline in kept
        assert len(kept & frames) == VIDEO_TOKENS // 4
        # Each kept row is run at its original 1-D position (its prompt row), each
        # generated token after the whole prompt: the draft's KV index differs, its positions do not.
        mine = [inp for inp in inputs if inp.req_id == req_id]
        assert all(bool((inp.positions == inp.positions[0]).all()) for inp in mine)
        prompt_rows = torch.cat([inp.positions[0] for inp in mine if inp.inputs_embeds is not None])
        assert prompt_rows.tolist() == view.keep_rows.tolist()
        generated = torch.cat([inp.positions[0] for inp in mine if inp.token_ids is not None])
        assert int(generated.min()) >= view.prompt_len
    assert model_positions and all(p.dim() == 1 for p in model_positions)  # plain RoPE: [num_tokens]
