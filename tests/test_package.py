"""Packaging contract: lazy vLLM import, the plugin entry point, the version gate."""

import ast
import os
import pathlib
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from hippo_vllm.vllm.seam import version_gate
from hippo_vllm.vllm.seam.version_gate import UnsupportedVllmVersion, check_vllm_version

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "hippo_vllm"


def test_importing_the_package_and_core_does_not_import_vllm():
    code = (
        "import sys, hippo_vllm, hippo_vllm.core, hippo_vllm.vllm, hippo_vllm.vllm.seam.plugin\n"
        "heavy = [m for m in ('vllm', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print(hippo_vllm.__version__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()


def _imported_modules(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_core_never_imports_vllm_even_lazily():
    offenders = {
        str(p.relative_to(PACKAGE)): sorted(_imported_modules(p) & {"vllm", "transformers"})
        for p in (PACKAGE / "core").rglob("*.py")
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_vllm_imports_stay_inside_the_vllm_subpackage():
    allowed = PACKAGE / "vllm"
    outside = [
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        if allowed not in p.parents and "vllm" in _imported_modules(p)
    ]
    assert outside == []


def test_plugin_entry_point_is_registered():
    hippo = [e for e in entry_points(group="vllm.general_plugins") if e.name == "hippo"]
    assert [e.value for e in hippo] == ["hippo_vllm.vllm.seam.plugin:register"]


def test_register_is_idempotent_and_active_on_the_installed_vllm():
    from hippo_vllm.vllm.seam.plugin import register

    assert register() is True
    assert register() is True


@pytest.mark.parametrize("version", ["0.32.0", "0.32.1+cpu", "0.33.0", "0.33.2rc1"])
def test_supported_versions_pass(version, monkeypatch):
    monkeypatch.delenv(version_gate.SKIP_VERSION_CHECK_ENV, raising=False)
    check_vllm_version(version)


@pytest.mark.parametrize("version", ["0.31.9", "0.34.0", "1.0.0"])
def test_unsupported_version_is_refused_with_the_allowed_list(version, monkeypatch):
    monkeypatch.delenv(version_gate.SKIP_VERSION_CHECK_ENV, raising=False)
    with pytest.raises(UnsupportedVllmVersion, match=rf"{version}.*0\.32\.x, 0\.33\.x|0\.32\.x, 0\.33\.x.*{version}"):
        check_vllm_version(version)


def test_version_check_can_be_overridden(monkeypatch):
    monkeypatch.setenv(version_gate.SKIP_VERSION_CHECK_ENV, "1")
    check_vllm_version("9.9.9")


def test_hippo_on_an_unsupported_vllm_is_refused_with_the_version_message(monkeypatch):
    from types import SimpleNamespace

    from hippo_vllm.vllm.seam.config_rewrite import rewrite_hippo_engine_args

    monkeypatch.delenv(version_gate.SKIP_VERSION_CHECK_ENV, raising=False)
    monkeypatch.setattr(version_gate, "installed_vllm_version", lambda: "0.40.0")
    args = SimpleNamespace(speculative_config={"method": "hippo", "model": "d"}, worker_cls="auto",
                           additional_config={})
    with pytest.raises(UnsupportedVllmVersion, match=r"0\.32\.x, 0\.33\.x; the installed vLLM is 0\.40\.0"):
        rewrite_hippo_engine_args(args)
    assert args.speculative_config == {"method": "hippo", "model": "d"}  # left as it was


def test_plugin_on_an_unsupported_vllm_stands_down_but_still_refuses_hippo_clearly():
    code = (
        "import vllm\n"
        "vllm.__version__ = '0.40.0'\n"
        "from hippo_vllm.vllm.seam import plugin\n"
        "assert plugin.register() is False\n"
        "from vllm.engine.arg_utils import EngineArgs\n"
        "args = EngineArgs(model='unused', speculative_config={'method': 'hippo', 'model': 'd'})\n"
        "args.create_engine_config()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != version_gate.SKIP_VERSION_CHECK_ENV}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode != 0
    assert "UnsupportedVllmVersion: hippo_vllm supports vLLM 0.32.x, 0.33.x; the installed vLLM is 0.40.0" in out.stderr


def test_texts_that_name_the_supported_vllm_agree_with_the_one_list():
    from packaging.requirements import Requirement

    from hippo_vllm.version import SUPPORTED_VLLM, vllm_requirement

    root = PACKAGE.parent
    readme = (root / "README.md").read_text()
    supported = readme.split("## Supported versions", 1)[1].split("\n## ", 1)[0]
    tools = root / "tools"
    for extra, requirements in (("cpu", tools / "requirements-cpu.txt"), ("gpu", tools / "requirements-cuda.txt")):
        distribution, series = SUPPORTED_VLLM[extra]
        assert f"{series}.x (`{distribution}`)" in supported
        lines = [line for line in requirements.read_text().splitlines() if line and not line.startswith("#")]
        (pinned,) = [r for r in map(Requirement, lines) if r.name == distribution]
        allowed = Requirement(vllm_requirement(extra)).specifier
        # Either the extra's own range or an exact pin inside it.
        exact = [spec.version for spec in pinned.specifier if spec.operator == "=="]
        assert pinned.specifier == allowed or (len(pinned.specifier) == 1 and exact
                                               and allowed.contains(exact[0])), (requirements, pinned)
        if extra == "cpu":
            assert f"`{pinned}`" in readme  # the quick start names the CPU environment's pin
        else:
            assert f"`{distribution}` {series}.x" in readme


def test_the_testbed_is_not_part_of_the_package():
    """hippo_testbed (fixture builders, the synthetic task, the trained pair) is for tests,
    benchmarks and examples, outside the installed package, which never imports it."""
    root = PACKAGE.parent
    assert not (PACKAGE / "fixtures").exists()
    importers = [str(p.relative_to(root)) for p in PACKAGE.rglob("*.py") if "hippo_testbed" in _imported_modules(p)]
    assert importers == []
