"""hippo_vllm: lossless speculative decoding for video LLMs in vLLM (HIPPO).

Importing this package (or ``hippo_vllm.core``) never imports vLLM: the scoring
core is plain torch, and everything that touches vLLM lives in ``hippo_vllm.vllm``,
which vLLM loads through the ``vllm.general_plugins`` entry point.
"""

from hippo_vllm.version import __version__

__all__ = ["__version__"]
