"""Packaging for hippo_vllm (metadata and entry points)."""

import pathlib
import runpy

from setuptools import find_packages, setup

ROOT = pathlib.Path(__file__).parent
# The version and the supported vLLM releases live in one file, run here on its own
# (importing the package would need its dependencies installed first).
VERSION_INFO = runpy.run_path(str(ROOT / "hippo_vllm" / "version.py"))

setup(
    name="hippo-vllm",
    version=VERSION_INFO["__version__"],
    description="Lossless speculative decoding for video LLMs in vLLM (HIPPO)",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["hippo_vllm", "hippo_vllm.*"]),
    # torch comes with vLLM; listing it unpinned keeps whatever build vLLM brought.
    # pyzmq and msgspec: the draft worker's wire imports them directly (vLLM uses both).
    install_requires=["torch", "numpy", "pyzmq", "msgspec"],
    extras_require={
        **{extra: [VERSION_INFO["vllm_requirement"](extra)] for extra in VERSION_INFO["SUPPORTED_VLLM"]},
        "test": ["pytest", "opencv-python-headless"],
        # The draft as a Ray actor ("draft_worker": {"placement": "ray"}).
        "ray": ["ray>=2.60,<3"],
    },
    entry_points={
        "vllm.general_plugins": ["hippo = hippo_vllm.vllm.seam.plugin:register"],
    },
)
