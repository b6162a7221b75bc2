"""The ``vllm.general_plugins`` entry point of hippo_vllm.

vLLM calls :func:`register` once per process (API server, engine core, workers),
and again in a fresh process after a fork or spawn, so it must be cheap and
idempotent. It installs the process-wide patches of the patch index: the rewrite
of ``"method": "hippo"`` into a configuration vLLM accepts, hippo's stat logger
next to vLLM's, the CPU sampling fix, the CPU renderer's quiet thread setting, and the guard that keeps top-k
sampling alive in steps without draft tokens. The draft itself lives in the hippo
worker, which vLLM imports by name. vLLM lets an exception from a general plugin abort start-up, so an
unsupported vLLM must not raise here: it only stands the plugin down with a
warning (only the config rewrite is installed, so that a later
``"method": "hippo"`` config is refused with the version message).
"""

from __future__ import annotations

from hippo_vllm.logs import get_logger

logger = get_logger(__name__)

_registered: bool | None = None  # None: not yet called in this process


def register() -> bool:
    """Activate hippo_vllm in this process; returns whether it is active."""
    global _registered
    if _registered is not None:
        return _registered

    from hippo_vllm.vllm.seam.version_gate import UnsupportedVllmVersion, check_vllm_version

    from hippo_vllm.vllm.metrics import stat_logger
    from hippo_vllm.vllm.seam import config_rewrite, cpu_sampling_fix, cpu_thread_binding_quiet, empty_logits_guard

    try:
        check_vllm_version()
    except UnsupportedVllmVersion as exc:
        logger.warning("hippo_vllm is inactive: %s", exc)
        # Only the config rewrite goes in, so that a "method": "hippo" config is
        # refused with the version message rather than vLLM's "unknown method".
        try:
            config_rewrite.install()
        except Exception:  # an unknown vLLM may lack the hook; the warning stands
            pass
        _registered = False
        return False

    config_rewrite.install()
    cpu_sampling_fix.install()
    cpu_thread_binding_quiet.install()
    empty_logits_guard.install()
    stat_logger.install()
    _registered = True
    return True
