"""Packaging for hippo_vllm (metadata, entry points and the kernels in csrc/).

The CPU kernel (``hippo_vllm._C_cpu``) is always built; the CUDA kernel
(``hippo_vllm._C_cuda``) where torch is a CUDA build and a CUDA toolkit (nvcc) is
found. Both are optional extensions: a failed compile (no compiler) leaves the
package without that kernel (``make setup`` then stops on a missing CPU one). Both
need torch at build time, so install with ``--no-build-isolation`` into an
environment that has it (``make setup`` does); without torch, or with
``HIPPO_BUILD_KERNELS=0``, the package installs without kernels and s_attn runs in
torch.
"""

import os
import pathlib
import runpy

from setuptools import find_packages, setup

ROOT = pathlib.Path(__file__).parent
# The version and the supported vLLM releases live in one file, run here on its own
# (importing the package would need its dependencies installed first).
VERSION_INFO = runpy.run_path(str(ROOT / "hippo_vllm" / "version.py"))



def kernel_extensions():
    """(ext_modules, cmdclass) for the kernels this machine can build."""
    if os.environ.get("HIPPO_BUILD_KERNELS", "1") == "0":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("hippo-vllm: torch is not importable at build time; installing without kernels")
        return [], {}
    csrc = ROOT / "csrc"
    # Relative paths: setuptools wants sources below the project directory.
    extensions = [
        cpp_extension.CppExtension(
            "hippo_vllm._C_cpu",
            ["csrc/video_attention_cpu.cpp"],
            include_dirs=[str(csrc)],
            extra_compile_args=["-O3", "-fopenmp"],
            extra_link_args=["-fopenmp"],
            optional=True,  # no compiler: install without it (s_attn runs in torch)
        )
    ]
    if torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None:
        extensions.append(
            cpp_extension.CUDAExtension(
                "hippo_vllm._C_cuda",
                ["csrc/video_attention_cuda.cu"],
                include_dirs=[str(csrc)],
                extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
                optional=True,
            )
        )
    else:
        print(f"hippo-vllm: no CUDA kernel (torch CUDA build: {torch.version.cuda}, "
              f"CUDA toolkit: {cpp_extension.CUDA_HOME})")

    class OptionalBuildExtension(cpp_extension.BuildExtension):
        """torch's builder, but a machine that cannot compile (no compiler: torch's own
        compiler check fails before any extension's ``optional`` applies) gets no kernels."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - the kernels are optional
                print(f"hippo-vllm: kernels not built ({type(exc).__name__}: {exc}); s_attn runs in torch")

    return extensions, {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


EXT_MODULES, CMDCLASS = kernel_extensions()

setup(
    name="hippo-vllm",
    version=VERSION_INFO["__version__"],
    description="Lossless speculative decoding for video LLMs in vLLM (HIPPO)",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["hippo_vllm", "hippo_vllm.*"]),
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
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
