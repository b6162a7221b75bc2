"""Model families: which checkpoints hippo serves, and Qwen2-VL and Qwen3-VL self-drafts.

The family checks are pure (configs only); the engine tests run the real vLLM
engine in-process on the tiny Qwen2-VL and Qwen3-VL checkpoints with real mp4s: the
target drafting for itself from every video token accepts everything (the Qwen3-VL
MoE target's are in test_qwen3_vl_moe.py). The lossless matrix of every family with a
smaller draft is test_family_matrix.py.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from engine_utils import counter, engine, generate_ids, hippo_config, proposer_of, text_request, video_request
from hippo_vllm.config import HippoConfig, HippoConfigError
from hippo_vllm.core import VideoGrid
from hippo_vllm.vllm.seam.config_rewrite import check_draft_against_target
from hippo_vllm.vllm.draft.view import build_draft_view
from hippo_vllm.vllm.model_families import QWEN2_5_VL, QWEN2_VL, QWEN3_VL, family_of

QUESTIONS = ("Describe this video.", "What moves in the video?")


def _config(tiny, name: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(getattr(tiny, name)))


@pytest.mark.parametrize(
    "name, family",
    [("target", QWEN2_5_VL), ("draft", QWEN2_5_VL), ("qwen2_vl_target", QWEN2_VL),
     ("qwen2_vl_draft", QWEN2_VL), ("qwen3_vl_target", QWEN3_VL), ("qwen3_vl_draft", QWEN3_VL),
     ("qwen3_vl_moe_target", QWEN3_VL), ("text_draft", None)],
)
def test_each_checkpoint_is_of_its_family(tiny, name, family):
    assert family_of(_config(tiny, name)) == family


@pytest.mark.parametrize("family", [QWEN2_5_VL, QWEN2_VL, QWEN3_VL])
def test_the_video_grid_is_the_merged_token_grid(family):
    feature = SimpleNamespace(data={"video_grid_thw": SimpleNamespace(data=torch.tensor([[4, 16, 12]]))})
    hf_config = SimpleNamespace(vision_config=SimpleNamespace(spatial_merge_size=2))
    assert family.video_grid(feature, hf_config) == VideoGrid(4, 8, 6)


def test_a_family_reads_the_targets_prompt_positions_for_the_draft():
    mrope = torch.arange(18).view(3, 6)
    positions, delta = QWEN3_VL.prompt_positions(4, mrope, -2)
    assert torch.equal(positions, mrope[:, :4]) and delta == -2
    unknown = dataclasses.replace(QWEN3_VL, positions="rope-1d")
    with pytest.raises(ValueError, match=r"Qwen3-VL: positions 'rope-1d' have no prompt positions for the draft; "
                                         r"allowed: \['1d', 'mrope'\]"):
        unknown.prompt_positions(4, mrope, -2)


def _check(tiny, target: str, draft) -> None:
    target_model_config = SimpleNamespace(
        model=str(getattr(tiny, target)), hf_config=_config(tiny, target), trust_remote_code=False,
        tokenizer=str(getattr(tiny, target)), tokenizer_revision=None,
    )
    check_draft_against_target(HippoConfig(model=str(draft)), target_model_config)


@pytest.mark.parametrize("target, draft", [("target", "draft"), ("qwen2_vl_target", "qwen2_vl_draft"),
                                           ("qwen2_vl_target", "qwen2_vl_target"),
                                           ("qwen3_vl_target", "qwen3_vl_draft"),
                                           ("qwen3_vl_moe_target", "qwen3_vl_draft"),
                                           ("qwen3_vl_moe_target", "qwen3_vl_moe_target"),
                                           ("qwen3_vl_target", "qwen3_vl_moe_target")])
def test_a_draft_of_the_targets_family_is_accepted(tiny, target, draft):
    _check(tiny, target, getattr(tiny, draft))


@pytest.mark.parametrize(
    "target, draft, message",
    [
        ("target", "qwen2_vl_draft", r"qwen2_vl_draft' is a Qwen2VLForConditionalGeneration \(Qwen2-VL family\), "
                                     r"the target '.*/target' a Qwen2_5_VLForConditionalGeneration "
                                     r"\(Qwen2.5-VL family\); the draft must be of the target's family"),
        ("qwen2_vl_target", "draft", r"draft' is a Qwen2_5_VLForConditionalGeneration \(Qwen2.5-VL family\), "
                                     r"the target '.*/qwen2_vl_target' a Qwen2VLForConditionalGeneration"),
        ("qwen2_vl_target", "text_draft", r"text_draft' is a Qwen2ForCausalLM, not a vision-language model "
                                          r"hippo can run as the draft; supported architectures: "
                                          r"\['Qwen2_5_VLForConditionalGeneration', 'Qwen2VLForConditionalGeneration', "
                                          r"'Qwen3VLForConditionalGeneration', "
                                          r"'Qwen3VLMoeForConditionalGeneration', "
                                          r"'LlavaOnevisionForConditionalGeneration'\]"),
        ("target", "qwen3_vl_draft", r"qwen3_vl_draft' is a Qwen3VLForConditionalGeneration \(Qwen3-VL family\), "
                                     r"the target '.*/target' a Qwen2_5_VLForConditionalGeneration "
                                     r"\(Qwen2.5-VL family\); the draft must be of the target's family"),
        ("qwen3_vl_target", "draft", r"draft' is a Qwen2_5_VLForConditionalGeneration \(Qwen2.5-VL family\), "
                                     r"the target '.*/qwen3_vl_target' a Qwen3VLForConditionalGeneration "
                                     r"\(Qwen3-VL family\)"),
        ("qwen3_vl_moe_target", "qwen2_vl_draft", r"qwen2_vl_draft' is a Qwen2VLForConditionalGeneration "
                                                  r"\(Qwen2-VL family\), the target '.*/qwen3_vl_moe_target' a "
                                                  r"Qwen3VLMoeForConditionalGeneration \(Qwen3-VL family\); the draft "
                                                  r"must be of the target's family"),
        ("target", "qwen3_vl_moe_target", r"qwen3_vl_moe_target' is a Qwen3VLMoeForConditionalGeneration "
                                          r"\(Qwen3-VL family\), the target '.*/target' a "
                                          r"Qwen2_5_VLForConditionalGeneration \(Qwen2.5-VL family\)"),
        ("text_draft", "draft", r"the target model '.*/text_draft' is a Qwen2ForCausalLM, not a "
                                r"vision-language model hippo can run as the target"),
    ],
)
def test_a_draft_of_another_family_or_an_unsupported_model_is_refused(tiny, target, draft, message):
    with pytest.raises(HippoConfigError, match=message):
        _check(tiny, target, getattr(tiny, draft))


def test_a_qwen2_vl_draft_with_a_larger_vocabulary_is_refused(tiny, tmp_path):
    draft = tmp_path / "draft"
    shutil.copytree(tiny.qwen2_vl_draft, draft)
    cfg = json.loads((draft / "config.json").read_text())
    cfg["text_config"]["vocab_size"] = cfg["vocab_size"] = 576
    (draft / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HippoConfigError, match=r"'.*/draft' has vocabulary size 576, larger than the target's 512"):
        _check(tiny, "qwen2_vl_target", draft)


def test_a_draft_whose_tower_merges_patches_otherwise_is_refused(tiny, tmp_path):
    draft = tmp_path / "draft"
    shutil.copytree(tiny.qwen3_vl_draft, draft)
    cfg = json.loads((draft / "config.json").read_text())
    cfg["vision_config"]["spatial_merge_size"] = 4
    (draft / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HippoConfigError, match=r"'.*/draft' has vision_config.spatial_merge_size=4, the target "
                                               r"'.*/qwen3_vl_target' 2; the draft's vision tower reads the "
                                               r"target's processor outputs, so for the Qwen3-VL family "
                                               r"patch_size, temporal_patch_size, spatial_merge_size must be"):
        _check(tiny, "qwen3_vl_target", draft)


def test_a_qwen3_vl_video_is_pruned_among_its_video_rows_and_its_text_rows_are_kept():
    # A Qwen3-VL placeholder per temporal patch: "<t seconds>" (3 rows here), vision
    # start, 4 video rows, vision end; is_embed marks the video rows only.
    frame = [False] * 4 + [True] * 4 + [False]
    is_embed = torch.tensor(frame * 2)
    offset, length = 5, is_embed.numel()
    feature = SimpleNamespace(modality="video", mm_position=SimpleNamespace(offset=offset, length=length,
                                                                           is_embed=is_embed))
    prompt_len = offset + length + 4
    view = build_draft_view(HippoConfig(model="draft", keep_ratio=0.5, pruning="uniform"), prompt_len, [feature],
                            [torch.randn(8, 16)], None, lambda f: VideoGrid(2, 2, 2))
    video_rows = offset + torch.nonzero(is_embed).flatten()
    kept = set(view.keep_rows.tolist())
    assert kept - set(video_rows.tolist()) == set(range(prompt_len)) - set(video_rows.tolist())
    assert len(kept & set(video_rows.tolist())) == 4
    assert (view.video_tokens, view.video_tokens_seen) == (8, 4)

    # The target's s_attn covers the whole placeholder; only its video rows rank them.
    attn = torch.zeros(length)
    favoured = video_rows[[0, 2, 5, 7]] - offset
    attn[favoured] = 1.0
    attn[~is_embed] = 5.0  # text rows score highest, but are not candidates
    view = build_draft_view(HippoConfig(model="draft", keep_ratio=0.5, pruning="attention"), prompt_len, [feature],
                            [torch.randn(8, 16)], [attn], lambda f: VideoGrid(2, 2, 2))
    assert set(view.keep_rows.tolist()) & set(video_rows.tolist()) == set((offset + favoured).tolist())
    assert view.attention_used


def _target_vllm_config(target):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(target), max_model_len=1024, enforce_eager=True).create_engine_config()


@pytest.mark.parametrize("target, draft, family", [("qwen2_vl_target", "qwen2_vl_draft", QWEN2_VL),
                                                   ("qwen3_vl_target", "qwen3_vl_draft", QWEN3_VL),
                                                   ("qwen3_vl_moe_target", "qwen3_vl_moe_target", QWEN3_VL)])
def test_the_draft_engine_builds_a_drafts_config_and_refuses_a_text_model(tiny, target, draft, family):
    from hippo_vllm.vllm.draft.draft_config import make_draft_vllm_config

    target = _target_vllm_config(getattr(tiny, target))
    draft = make_draft_vllm_config(target, getattr(tiny, draft))
    assert draft.model_config.uses_mrope and family_of(draft.model_config.hf_config) == family
    with pytest.raises(ValueError, match=r"text_draft \(\['Qwen2ForCausalLM'\]\) is of no vision-language "
                                         r"model family hippo supports; supported architectures: "):
        make_draft_vllm_config(target, tiny.text_draft)


# -- Qwen2-VL served by the real engine ---------------------------------------------------

K = 3


@pytest.fixture(scope="module")
def requests(tiny, tiny_tokenizer):
    videos = tiny.synthetic_videos
    reqs = [video_request(tiny_tokenizer, QUESTIONS[i % 2], videos[i]) for i in range(3)]
    return reqs + [text_request(tiny_tokenizer, QUESTIONS[0])]


@pytest.fixture(scope="module")
def baseline(tiny, requests):
    with engine(tiny.qwen2_vl_target) as llm:
        ids = generate_ids(llm, requests, max_tokens=24)
    # Each prompt (three videos, one text) gets its own output, so a draft fed the
    # wrong video rows or positions cannot match them by luck.
    assert len(set(ids)) == len(ids)
    return ids


def spec_counters(llm) -> tuple[float, float]:
    return (counter(llm, "vllm:spec_decode_num_draft_tokens"),
            counter(llm, "vllm:spec_decode_num_accepted_tokens"))


@pytest.mark.engine
def test_qwen2_vl_self_draft_keeping_every_token_is_lossless_and_accepts_everything(tiny, requests, baseline):
    config = hippo_config(tiny.qwen2_vl_target, K, parallel=False, keep_ratio=1.0)
    with engine(tiny.qwen2_vl_target, speculative_config=config) as llm:
        assert generate_ids(llm, requests, max_tokens=24) == baseline
        drafted, accepted = spec_counters(llm)
        stats = proposer_of(llm).stats
    assert drafted > 0 and accepted / drafted >= 0.99, (drafted, accepted)
    assert stats.video_tokens_seen == stats.video_tokens_total > 0


# -- Qwen3-VL served by the real engine ---------------------------------------------------
# Its prompt holds "<t seconds>" text and vision start/end tokens inside each video's
# placeholder, its M-RoPE is interleaved, and its ViT's DeepStack features are added to
# the first decoder layers' outputs on the video rows; a draft that lost any of these
# for its kept rows would not accept everything when it keeps every token.


@pytest.fixture(scope="module")
def qwen3_vl_baseline(tiny, requests):
    with engine(tiny.qwen3_vl_target) as llm:
        ids = generate_ids(llm, requests, max_tokens=24)
    assert len(set(ids)) == len(ids)
    return ids


@pytest.mark.engine
def test_qwen3_vl_self_draft_keeping_every_token_is_lossless_and_accepts_everything(tiny, requests,
                                                                                    qwen3_vl_baseline):
    config = hippo_config(tiny.qwen3_vl_target, K, parallel=False, keep_ratio=1.0)
    with engine(tiny.qwen3_vl_target, speculative_config=config) as llm:
        assert generate_ids(llm, requests, max_tokens=24) == qwen3_vl_baseline
        drafted, accepted = spec_counters(llm)
        stats = proposer_of(llm).stats
    assert drafted > 0 and accepted / drafted >= 0.99, (drafted, accepted)
    assert stats.video_tokens_seen == stats.video_tokens_total == 3 * 64


def test_a_moe_draft_under_data_parallelism_is_refused_and_a_dense_one_is_not(tiny):
    from hippo_vllm.vllm.seam.config_rewrite import check_draft_parallelism

    moe, dense = _config(tiny, "qwen3_vl_moe_target"), _config(tiny, "qwen3_vl_draft")
    hippo = HippoConfig(model=str(tiny.qwen3_vl_moe_target))
    with pytest.raises(HippoConfigError, match=r"qwen3_vl_moe_target' is a mixture-of-experts model \(4 experts\) "
                                               r"and data_parallel_size is 2: a MoE draft runs only with "
                                               r"data_parallel_size 1"):
        check_draft_parallelism(hippo, moe, SimpleNamespace(data_parallel_size=2))
    check_draft_parallelism(hippo, moe, SimpleNamespace(data_parallel_size=1))
    check_draft_parallelism(hippo, dense, SimpleNamespace(data_parallel_size=2))
