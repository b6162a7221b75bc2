"""The patch index names exactly the patches the code applies."""

from __future__ import annotations

import ast
import importlib
import pathlib

import hippo_vllm.vllm as integration
from hippo_vllm.vllm.patch_index import PATCHES

PATCH_FUNCTIONS = {"patch_attribute", "temporarily_patched"}


def patch_calls() -> set[tuple[str, str]]:
    """(module, patched attribute name) for every patch call in hippo_vllm.vllm."""
    root = pathlib.Path(integration.__file__).parent
    found = set()
    for path in root.glob("*.py"):
        if path.name == "patching.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in PATCH_FUNCTIONS:
                name = node.args[1]
                assert isinstance(name, ast.Constant), f"{path.name}: patch target must be a literal"
                found.add((f"hippo_vllm.vllm.{path.stem}", name.value))
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
        for part in attr_path.split("."):
            obj = getattr(obj, part)
