"""hippo_vllm.core must stay importable without vLLM or transformers (see its package docstring)."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import hippo_vllm.core

CORE_DIR = pathlib.Path(hippo_vllm.core.__file__).parent
FORBIDDEN = ("vllm", "transformers")


def imported_top_level_names(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_no_core_file_imports_vllm_or_transformers():
    files = sorted(CORE_DIR.glob("*.py"))
    assert len(files) >= 9
    for path in files:
        assert not imported_top_level_names(path) & set(FORBIDDEN), path.name


def test_importing_core_loads_neither_package():
    code = (
        "import sys, hippo_vllm.core; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in {'vllm', 'transformers'}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_kernels_package_imports_neither_vllm_nor_transformers():
    # hippo_vllm.ops (the s_attn kernel's dispatch and torch fallback) sits beside the core.
    code = (
        "import sys, hippo_vllm.ops; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in {'vllm', 'transformers'}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
