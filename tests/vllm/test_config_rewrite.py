"""`"method": "hippo"` becomes a config vLLM accepts, and bad input stops start-up clearly."""

from __future__ import annotations

import json
import shutil

import pytest

from hippo_vllm.config import HippoConfigError
from hippo_vllm.config import hippo_settings
from hippo_vllm.vllm.seam.config_rewrite import (
    CPU_WORKER_PATH,
    PROPOSER_CLASS_PATH,
    looks_like_local_path,
)


def engine_config(target, speculative_config, **kwargs):
    from vllm.engine.arg_utils import EngineArgs

    import hippo_vllm.vllm.seam.plugin as plugin

    plugin.register()
    args = EngineArgs(model=str(target), max_model_len=1024, enforce_eager=True,
                      speculative_config=speculative_config, **kwargs)
    return args.create_engine_config()


def test_hippo_is_rewritten_to_custom_class_with_settings_in_additional_config(tiny):
    config = engine_config(tiny.target, {"method": "hippo", "model": str(tiny.draft),
                                         "num_speculative_tokens": 4, "keep_ratio": 0.25})
    assert config.speculative_config.method == "custom_class"
    assert config.speculative_config.model == PROPOSER_CLASS_PATH
    # Draft-then-verify (the default): vLLM verifies all 4 (parallel mode would hand
    # it 3 and check each chunk's first token beside its rejection sampler).
    assert config.speculative_config.num_speculative_tokens == 4
    assert config.parallel_config.worker_cls == CPU_WORKER_PATH
    hippo = hippo_settings(config)
    assert (hippo.model, hippo.keep_ratio, hippo.num_speculative_tokens) == (str(tiny.draft), 0.25, 4)


def test_other_methods_pass_through_untouched(tiny):
    config = engine_config(tiny.target, {"method": "ngram", "num_speculative_tokens": 2,
                                         "prompt_lookup_max": 2})
    assert config.speculative_config.method == "ngram"
    assert hippo_settings(config) is None


def _draft_with(tmp_path, tiny, **changes):
    path = tmp_path / "draft"
    shutil.copytree(tiny.draft, path)
    cfg = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        section, _, name = key.rpartition(".")
        (cfg[section] if section else cfg)[name] = value
    (path / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"keep_ratio": 1.5}, r'\["keep_ratio"\]=1.5 .*\[0, 1\]'),
        ({"keep_rato": 0.1}, r"Unknown key\(s\) \['keep_rato'\]"),
        ({"num_speculative_tokens": 0}, r'\["num_speculative_tokens"\]=0'),
        ({"attn_layers": [0, 9]}, r"< 3, the target's number of layers \(out of range: \[9\]\)"),
        ({"model": "/nonexistent/draft"}, r"'/nonexistent/draft': draft checkpoint not found, "
                                          r"there is no directory '/nonexistent/draft'"),
        ({"model": "./missing/draft"}, r"draft checkpoint not found, there is no directory '/.*/missing/draft'"),
    ],
)
def test_bad_keys_and_values_stop_start_up_naming_them(tiny, overrides, message):
    with pytest.raises(HippoConfigError, match=message):
        engine_config(tiny.target, {"method": "hippo", "model": str(tiny.draft), **overrides})


@pytest.mark.parametrize("model", ["Qwen/Qwen2.5-VL-3B-Instruct", "my-draft", "org/name.v2"])
def test_hub_ids_are_not_taken_for_missing_paths(model):
    assert not looks_like_local_path(model)


@pytest.mark.parametrize("model", ["/abs/draft", "./draft", "../draft", "~/draft", "runs/1/draft", "C:\\draft"])
def test_paths_that_cannot_be_hub_ids_are_recognised(model):
    assert looks_like_local_path(model)


def test_a_relative_checkpoint_directory_still_loads(tiny, tmp_path, monkeypatch):
    shutil.copytree(tiny.draft, tmp_path / "drafts" / "v1" / "draft")
    monkeypatch.chdir(tmp_path)
    config = engine_config(tiny.target, {"method": "hippo", "model": "./drafts/v1/draft"})
    assert hippo_settings(config).model == "./drafts/v1/draft"


def test_a_text_only_draft_is_refused(tiny):
    with pytest.raises(HippoConfigError, match=r"is a Qwen2ForCausalLM, not a vision-language model"):
        engine_config(tiny.target, {"method": "hippo", "model": str(tiny.text_draft)})


def test_a_draft_with_a_larger_vocabulary_is_refused(tiny, tmp_path):
    draft = _draft_with(tmp_path, tiny, **{"text_config.vocab_size": 576, "vocab_size": 576})
    with pytest.raises(HippoConfigError, match=r"vocabulary size 576, larger than the target's 512"):
        engine_config(tiny.target, {"method": "hippo", "model": str(draft)})


def test_a_custom_worker_class_cannot_be_combined(tiny):
    with pytest.raises(HippoConfigError, match=r"--worker-cls='my.Worker' cannot be combined"):
        engine_config(tiny.target, {"method": "hippo", "model": str(tiny.draft)}, worker_cls="my.Worker")


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"pipeline_parallel_size": 2}, r"--pipeline-parallel-size=2 cannot be combined with \"method\": \"hippo\""),
        ({"async_scheduling": True}, r"--async-scheduling cannot be combined with \"method\": \"hippo\".*"
                                     r"--no-async-scheduling"),
    ],
)
def test_pipeline_parallelism_and_async_scheduling_are_refused_with_a_hippo_message(tiny, flags, message):
    with pytest.raises(HippoConfigError, match=message):
        engine_config(tiny.target, {"method": "hippo", "model": str(tiny.draft)}, **flags)


def test_async_scheduling_left_unset_is_off_and_explicitly_off_is_accepted(tiny):
    for flags in ({}, {"async_scheduling": False}):
        config = engine_config(tiny.target, {"method": "hippo", "model": str(tiny.draft)}, **flags)
        assert not config.scheduler_config.async_scheduling


def test_a_draft_with_the_targets_tokenizer_and_fewer_padding_rows_is_accepted(tiny, tmp_path):
    # As Qwen2.5-VL-3B (151,936 rows) drafting for 7B (152,064): one tokenizer.
    draft = _draft_with(tmp_path, tiny, **{"text_config.vocab_size": 508})
    config = engine_config(tiny.target, {"method": "hippo", "model": str(draft)})
    assert hippo_settings(config).model == str(draft)


def test_a_draft_with_another_tokenizer_is_refused(tiny, tmp_path):
    draft = _draft_with(tmp_path, tiny)
    tokenizer = json.loads((draft / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    token = next(iter(vocab))
    vocab[token + "_renamed"] = vocab.pop(token)
    (draft / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(HippoConfigError, match=r"has a tokenizer of \d+ ids that differs from the target's"):
        engine_config(tiny.target, {"method": "hippo", "model": str(draft)})
