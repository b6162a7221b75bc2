"""The shape of ``hippo_vllm/vllm/``: its wings import only downwards, and one module reads vLLM's step state.

The wings, from the top (see the package docstring): ``seam`` (where vLLM calls
in), ``target`` (the target's side of drafting), ``placements`` (where the draft
runs), then ``draft`` (the draft's side) and ``metrics``, over the shared modules.
A module may import its own wing, any wing below it and the shared modules; the
target's side knows the placements only through their interface (``backend``).
"""

from __future__ import annotations

import ast
import dataclasses
import pathlib

import pytest

import hippo_vllm.vllm

PACKAGE = pathlib.Path(hippo_vllm.vllm.__file__).parent
LEVELS = {"seam": 3, "target": 2, "placements": 1, "draft": 0, "metrics": 0}
SHARED = {"protocol", "model_families", "tensor_parallel", "patching", "patch_index"}
# The one module that reads vLLM's runner and scheduler output.
STEP_RECORDS = "target/step_records.py"


def _modules() -> dict[str, pathlib.Path]:
    return {str(p.relative_to(PACKAGE)): p for p in sorted(PACKAGE.rglob("*.py"))}


def _hippo_imports(path: pathlib.Path) -> list[tuple[int, list[str]]]:
    """(line, path below hippo_vllm.vllm) of every import of this package, lazy ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] if node.module != "hippo_vllm.vllm" else [
                f"hippo_vllm.vllm.{a.name}" for a in node.names
            ]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            if name.startswith("hippo_vllm.vllm."):
                found.append((node.lineno, name.split(".")[2:]))
    return found


def _wing(parts: list[str]) -> str:
    return parts[0]


def test_every_module_is_in_a_wing_or_shared():
    loose = [m for m in _modules() if "/" not in m and m[:-3] not in SHARED and m != "__init__.py"]
    wings = {m.split("/")[0] for m in _modules() if "/" in m}
    assert loose == [] and wings == set(LEVELS)


def test_wings_import_only_their_own_wing_lower_wings_and_shared_modules():
    wrong = []
    for name, path in _modules().items():
        if "/" not in name:  # a shared module imports only shared modules
            own_level = -1
            own = None
        else:
            own = name.split("/")[0]
            own_level = LEVELS[own]
        for line, parts in _hippo_imports(path):
            wing = _wing(parts)
            if wing in SHARED or wing == own:
                continue
            if wing not in LEVELS or LEVELS[wing] >= own_level:
                wrong.append(f"{name}:{line} imports {'.'.join(parts)}")
            elif own == "target" and wing == "placements" and parts[1:] != ["backend"]:
                wrong.append(f"{name}:{line} imports {'.'.join(parts)} (the target's side knows only the interface)")
    assert wrong == []


def test_the_layering_check_sees_a_wrong_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from hippo_vllm.vllm.seam.model_runner import x\n")
    assert _hippo_imports(bad) == [(2, ["seam", "model_runner"])]


def _vllm_state_names() -> set[str]:
    """Attribute names that belong to vLLM's runner, its request states and its scheduler output,
    and to none of hippo's own records."""
    from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
    from vllm.v1.worker.gpu_input_batch import CachedRequestState

    names = {"input_batch", "requests", "get_kv_cache_spec", "kv_cache_groups", "token_ids_cpu",
             "num_tokens_no_spec"}
    for cls in (SchedulerOutput, CachedRequestData, NewRequestData, CachedRequestState):
        names |= {f.name for f in dataclasses.fields(cls)}
    return names - _hippo_record_fields()


def _hippo_record_fields() -> set[str]:
    """Fields of the dataclasses hippo_vllm.vllm defines (its own records share some names with vLLM's)."""
    fields = set()
    for path in _modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                "dataclass" in ast.unparse(d) for d in node.decorator_list
            ):
                fields |= {n.target.id for n in node.body if isinstance(n, ast.AnnAssign)
                           and isinstance(n.target, ast.Name)}
    return fields


def _reads(path: pathlib.Path, names: set[str]) -> list[str]:
    return [
        f"{node.lineno}: .{node.attr}"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute) and node.attr in names
    ]


def test_step_records_is_the_one_reader_of_vllms_step_state():
    """Outside ``draft/``: the draft's side never sees the target's runner (it may not import the
    target's wing), and the names it reads are of its own engine (its layers' KV cache spec, its
    chunk drafter's requests)."""
    names = _vllm_state_names()
    assert {"scheduled_new_reqs", "input_batch", "mrope_positions"} <= names
    readers = {name: _reads(path, names) for name, path in _modules().items()
               if name != STEP_RECORDS and not name.startswith("draft/")}
    assert {name: reads for name, reads in readers.items() if reads} == {}
    assert _reads(PACKAGE / STEP_RECORDS, names)  # the check sees reads where they are


@pytest.mark.parametrize("module", ["seam/model_runner.py", "target/proposer.py", "model_families.py"])
def test_the_modules_that_used_to_read_vllms_state_no_longer_do(module):
    assert _reads(PACKAGE / module, _vllm_state_names()) == []
