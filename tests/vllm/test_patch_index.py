"""The patch index names exactly the patches the code applies, statically and in a real engine."""

from __future__ import annotations

import ast
import importlib
import pathlib

import pytest

import hippo_vllm.vllm as integration
from hippo_vllm.vllm.patch_index import PATCHES

PATCH_FUNCTIONS = {"patch_attribute", "patch_instance_attribute", "temporarily_patched"}


def patch_calls() -> set[tuple[str, str]]:
    """(module, patched attribute name) for every patch call in hippo_vllm.vllm."""
    root = pathlib.Path(integration.__file__).parent
    found = set()
    for path in root.rglob("*.py"):
        if path.name == "patching.py":
            continue
        module = ".".join(("hippo_vllm", "vllm", *path.relative_to(root).with_suffix("").parts))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in PATCH_FUNCTIONS:
                name = node.args[1]
                assert isinstance(name, ast.Constant), f"{path.name}: patch target must be a literal"
                found.add((module, name.value))
    return found


def test_every_patch_call_is_indexed_and_every_entry_is_used():
    indexed = {(p.module, p.target.rsplit(":", 1)[1].rsplit(".", 1)[-1]) for p in PATCHES}
    assert patch_calls() == indexed


def test_every_entry_says_why_and_when_it_can_go():
    for entry in PATCHES:
        assert len(entry.why) > 40 and len(entry.remove_when) > 20, entry.target


def test_indexed_targets_exist_in_the_installed_vllm():
    for entry in PATCHES:
        module_name, attr_path = entry.target.split(":")
        obj = importlib.import_module(module_name)
        parts = attr_path.split(".")
        # A per-instance target is "Class.instance_attribute.attribute": only the class
        # is reachable without building one.
        for part in parts[:1] if entry.per_instance else parts:
            obj = getattr(obj, part)


@pytest.mark.engine
def test_a_hippo_engine_applies_exactly_the_indexed_patches(tiny, tiny_tokenizer):
    from engine_utils import engine, generate_ids, hippo_config, proposer_of, video_request

    from hippo_vllm.vllm.patching import applied_patches

    request = video_request(tiny_tokenizer, "Describe this video.", tiny.synthetic_videos[0])
    with engine(tiny.target, speculative_config=hippo_config(tiny.draft)) as llm:
        assert proposer_of(llm).capture is not None  # the default pruning uses s_attn
        generate_ids(llm, [request], max_tokens=4)
        applied = applied_patches()
    assert applied == {entry.target for entry in PATCHES
                       if "cpu" in entry.platforms and not entry.only_with_tensor_parallelism}
