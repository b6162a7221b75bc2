"""Loggers of hippo_vllm, placed in vLLM's logger tree.

vLLM's entry points (``vllm serve``, the engine core, ``LLM``) configure a
handler, a format and a level (``VLLM_LOGGING_LEVEL``, INFO by default) only for
its ``"vllm"`` logger, which does not propagate to the root logger; a logger
outside that tree has no handler, so its INFO lines vanish.
Every hippo_vllm logger is therefore a child of ``"vllm"``: its lines print
where vLLM's print, in vLLM's format, and follow vLLM's level. Naming a logger
needs no vLLM import, so the vLLM-free parts of the package may use this too.
"""

from __future__ import annotations

import logging

ROOT_LOGGER_NAME = "vllm.hippo_vllm"  # parent of every hippo_vllm logger


def get_logger(module_name: str) -> logging.Logger:
    """The logger of a hippo_vllm module (pass its ``__name__``), under vLLM's tree."""
    return logging.getLogger(f"vllm.{module_name}")
