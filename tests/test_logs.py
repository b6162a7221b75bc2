"""hippo_vllm's log lines reach vLLM's log output under vLLM's own configuration."""

from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys

import hippo_vllm
from hippo_vllm.logs import ROOT_LOGGER_NAME, get_logger

PACKAGE = pathlib.Path(hippo_vllm.__file__).parent


def test_module_loggers_are_children_of_vllms_logger():
    assert get_logger("hippo_vllm.vllm.target.proposer").name == f"{ROOT_LOGGER_NAME}.vllm.target.proposer"
    assert ROOT_LOGGER_NAME.startswith("vllm.")


def test_no_module_creates_a_logger_of_its_own():
    direct = [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if path.name != "logs.py"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute) and node.attr == "getLogger"
    ]
    assert direct == []


def test_info_lines_print_with_vllms_default_logging_config():
    # A fresh process that configures logging as vLLM's entry points do, with the
    # defaults (no VLLM_LOGGING_LEVEL: INFO), then loads the plugin the way vLLM
    # does; on an unsupported version register() logs that it stands down.
    code = (
        "import vllm\n"
        "vllm.__version__ = '0.40.0'\n"
        "from vllm.config.logging import LoggingConfig\n"
        "from vllm.logger import configure_logging\n"
        "configure_logging(LoggingConfig())\n"
        "from vllm.plugins import load_general_plugins\n"
        "load_general_plugins()\n"
        "from hippo_vllm.logs import get_logger\n"
        "get_logger('hippo_vllm.vllm.target.proposer').info('hippo info line')\n"
    )
    env = {k: v for k, v in os.environ.items()
           if k not in ("VLLM_LOGGING_LEVEL", "VLLM_CONFIGURE_LOGGING", "HIPPO_VLLM_SKIP_VERSION_CHECK")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    printed = out.stdout + out.stderr
    lines = printed.splitlines()
    assert any("INFO" in line and "hippo info line" in line for line in lines), printed
    assert any("WARNING" in line and "hippo_vllm is inactive" in line for line in lines), printed
