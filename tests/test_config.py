"""HippoConfig: defaults, accepted values, and one clear message per bad value."""

import pytest

from hippo_vllm.config import HippoConfig, HippoConfigError


def test_defaults_match_the_documented_table():
    cfg = HippoConfig.from_speculative_config({"method": "hippo", "model": "/ckpt/draft"})
    assert cfg.num_speculative_tokens == 5
    assert cfg.keep_ratio == 0.1
    assert cfg.score_weights == {"attn": 1.0, "temp": 1.0, "spa": 1.0}
    assert cfg.attn_layers == "all"
    assert (cfg.crop_size, cfg.selection, cfg.pruning, cfg.parallel) == (5, "global", "holistic", False)
    assert cfg.draft_kv_tokens == "auto" and cfg.draft_length == "fixed"
    worker = cfg.draft_worker
    assert (worker.placement, worker.device, worker.cpu_cores) == ("in_process", None, None)
    assert (worker.timeout_ms, worker.max_restarts, worker.start_timeout_s) == (1000.0, 3, 600.0)


def test_every_key_round_trips_through_to_dict():
    raw = {
        "model": "d", "num_speculative_tokens": 3, "keep_ratio": 1, "crop_size": 3,
        "score_weights": {"attn": 0, "temp": 2}, "attn_layers": [2, 0], "selection": "per_frame",
        "pruning": "specvlm", "parallel": False, "draft_kv_tokens": 4096,
        "draft_worker": {"placement": "process", "device": "cuda:4", "cpu_cores": [3, 1],
                         "timeout_ms": 50, "max_restarts": 0, "start_timeout_s": 60},
    }
    cfg = HippoConfig.from_speculative_config(raw)
    assert cfg.score_weights == {"attn": 0.0, "temp": 2.0, "spa": 1.0}
    assert cfg.attn_layers == (0, 2)
    assert cfg.draft_worker.cpu_cores == (3, 1) and cfg.draft_worker.timeout_s == 0.05
    assert HippoConfig(**cfg.to_dict()) == cfg


def test_keep_ratio_zero_is_the_draft_without_video():
    assert HippoConfig.from_speculative_config({"model": "d", "keep_ratio": 0}).keep_ratio == 0.0


def test_dashed_keys_are_accepted_like_vllm_does():
    cfg = HippoConfig.from_speculative_config({"model": "d", "keep-ratio": 0.5})
    assert cfg.keep_ratio == 0.5


@pytest.mark.parametrize(
    "raw, needle",
    [
        ({"model": "d", "keep_rato": 0.1}, r"Unknown key\(s\) \['keep_rato'\].*Allowed keys"),
        ({"keep_ratio": 0.1}, r'\["model"\] is required'),
        ({"model": ""}, r'\["model"\]=\'\''),
        ({"model": "d", "keep_ratio": -0.1}, r'\["keep_ratio"\]=-0.1 .*\[0, 1\]'),
        ({"model": "d", "keep_ratio": 1.5}, r'\["keep_ratio"\]=1.5 .*\[0, 1\]'),
        ({"model": "d", "keep_ratio": float("nan")}, r'\["keep_ratio"\]=nan'),
        ({"model": "d", "keep_ratio": "0.1"}, r'\["keep_ratio"\]=\'0.1\''),
        ({"model": "d", "keep_ratio": True}, r'\["keep_ratio"\]=True'),
        ({"model": "d", "num_speculative_tokens": 0, "parallel": False}, r'\["num_speculative_tokens"\]=0 .*: an integer >= 1'),
        ({"model": "d", "num_speculative_tokens": 2.0}, r'\["num_speculative_tokens"\]=2.0'),
        ({"model": "d", "num_speculative_tokens": 1, "parallel": True},
         r'=1 is not allowed: an integer >= 2 with "parallel": true.*>= 1 with "parallel": false'),
        ({"model": "d", "num_speculative_tokens": 0, "parallel": True}, r'=0 is not allowed: an integer >= 2 with "parallel": true'),
        ({"model": "d", "crop_size": 4}, r'\["crop_size"\]=4 .*odd integer >= 3'),
        ({"model": "d", "crop_size": 1}, r'\["crop_size"\]=1 '),
        ({"model": "d", "selection": "local"}, r"\['global', 'per_frame'\]"),
        ({"model": "d", "pruning": "random"}, r"'holistic'.*'none'"),
        ({"model": "d", "parallel": "yes"}, r'\["parallel"\]=\'yes\' .*true or false'),
        ({"model": "d", "score_weights": {"attn": 0, "temp": 0, "spa": 0}}, r"not all 0"),
        ({"model": "d", "score_weights": {"motion": 1}}, r"unknown signal\(s\) \['motion'\]"),
        ({"model": "d", "score_weights": {"attn": -1}}, r"attn=-1"),
        ({"model": "d", "score_weights": [1, 1, 1]}, r'\["score_weights"\]=\[1, 1, 1\]'),
        ({"model": "d", "attn_layers": []}, r'\["attn_layers"\]=\[\]'),
        ({"model": "d", "attn_layers": [0, 0]}, r"distinct"),
        ({"model": "d", "attn_layers": "first"}, r'\["attn_layers"\]=\'first\''),
        ({"model": "d", "draft_kv_tokens": 0}, r'\["draft_kv_tokens"\]=0 .*"auto" or an integer >= 1'),
        ({"model": "d", "draft_kv_tokens": 1.5e6}, r'\["draft_kv_tokens"\]=1500000.0 '),
        ({"model": "d", "draft_kv_tokens": "max"}, r'\["draft_kv_tokens"\]=\'max\' '),
        ({"model": "d", "draft_kv_tokens": True}, r'\["draft_kv_tokens"\]=True '),
        ({"model": "d", "method": "draft_model"}, r'\["method"\]=\'draft_model\''),
        ({"model": "d", "draft_worker": "process"}, r'\["draft_worker"\]=\'process\' .*an object with keys'),
        ({"model": "d", "draft_worker": {"placment": "ray"}},
         r'Unknown key\(s\) \[\'placment\'\] in speculative_config\["draft_worker"\]. Allowed keys'),
        ({"model": "d", "draft_worker": {"placement": "thread"}},
         r'\["draft_worker"\]\["placement"\]=\'thread\' .*\[\'in_process\', \'process\', \'ray\'\]'),
        ({"model": "d", "draft_worker": {"placement": "process", "device": "gpu4"}},
         r'\["device"\]=\'gpu4\' .*"cpu" or "cuda:N"'),
        ({"model": "d", "draft_worker": {"placement": "process", "device": "cuda"}}, r'\["device"\]=\'cuda\' '),
        ({"model": "d", "draft_worker": {"placement": "ray", "device": "cuda:4"}}, r'Ray assigns the GPU'),
        ({"model": "d", "draft_worker": {"device": "cuda:4"}}, r'null with "placement": "in_process"'),
        ({"model": "d", "draft_worker": {"placement": "process", "cpu_cores": []}}, r'\["cpu_cores"\]=\[\] '),
        ({"model": "d", "draft_worker": {"placement": "process", "cpu_cores": [1, 1]}}, r'distinct CPU core ids'),
        ({"model": "d", "draft_worker": {"cpu_cores": [1]}}, r'\["cpu_cores"\]=\[1\] .*in_process'),
        ({"model": "d", "draft_worker": {"placement": "ray", "timeout_ms": 0}}, r'\["timeout_ms"\]=0 .*> 0'),
        ({"model": "d", "draft_worker": {"placement": "ray", "max_restarts": -1}}, r'\["max_restarts"\]=-1 '),
        ({"model": "d", "draft_worker": {"placement": "ray", "start_timeout_s": "1m"}},
         r'\["start_timeout_s"\]=\'1m\' '),
        ({"model": "d", "draft_length": "auto"}, r'\["draft_length"\]=\'auto\' .*\[\'fixed\', \'adaptive\'\]'),
        ({"model": "d", "draft_length": "adaptive", "draft_worker": {"placement": "process"}},
         r'\["draft_length"\]=\'adaptive\' .*unless "parallel" is true'),
        ({"model": "d", "draft_length": "adaptive", "parallel": True},
         r'\["draft_length"\]=\'adaptive\' .*a worker of its own'),
    ],
)
def test_bad_values_name_the_key_the_value_and_what_is_allowed(raw, needle):
    with pytest.raises(HippoConfigError, match=needle):
        HippoConfig.from_speculative_config(raw)


def test_the_adaptive_length_is_for_vpsd_with_a_draft_of_its_own():
    for placement in ("process", "ray"):
        cfg = HippoConfig.from_speculative_config({
            "model": "d", "parallel": True, "draft_length": "adaptive", "num_speculative_tokens": 8,
            "draft_worker": {"placement": placement}})
        assert cfg.draft_length == "adaptive" and cfg.vllm_num_speculative_tokens == 7
        assert HippoConfig(**cfg.to_dict()) == cfg


def test_vllm_verifies_one_token_less_per_step_in_parallel_mode():
    assert HippoConfig(model="d", num_speculative_tokens=4, parallel=True).vllm_num_speculative_tokens == 3
    assert HippoConfig(model="d", num_speculative_tokens=4).vllm_num_speculative_tokens == 4
    assert HippoConfig(model="d", num_speculative_tokens=1).vllm_num_speculative_tokens == 1


def test_attn_layers_are_checked_against_the_target_depth():
    cfg = HippoConfig(model="d", attn_layers=[0, 5])
    assert HippoConfig(model="d").resolve_attn_layers(3) == (0, 1, 2)
    assert cfg.resolve_attn_layers(6) == (0, 5)
    with pytest.raises(HippoConfigError, match=r"< 3.*out of range: \[5\]"):
        cfg.resolve_attn_layers(3)
