"""Everything in hippo_vllm that imports vLLM.

vLLM calls :func:`hippo_vllm.vllm.plugin.register` in each of its processes through
the ``vllm.general_plugins`` entry point. This ``__init__`` stays import-free so that
resolving the entry point costs nothing.
"""
