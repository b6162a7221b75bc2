"""No "torch.set_num_threads after the thread binding" warning per request on vLLM's CPU backend.

vLLM's CPU worker binds its threads to cores and then replaces ``torch.set_num_threads``
for the whole process with a stand-in that skips the call and logs a warning
(``vllm/v1/worker/cpu_worker.py``). vLLM's renderer sets torch's thread count around
every request's multimodal processing (``set_default_torch_num_threads`` in
``vllm/renderers/base.py``: once to set, once to restore). With the worker in the
same process as the renderer (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, as the benchmarks
and tests run it), each request therefore logs the warning twice, hundreds of identical
lines in a benchmark, while the call changes nothing. The multimodal encoder budget does
the same four times per engine start (``vllm/multimodal/encoder_budget.py``).

The replacement skips exactly those calls: when the CPU worker's stand-in is in place,
the thread count is already fixed by the binding, so the context sets nothing; otherwise
it is vLLM's own. Applied on the CPU platform only, to the renderer's and the encoder
budget's references. (The worker's own one-time call at start still warns once.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

_CPU_WORKER_MODULE = "vllm.v1.worker.cpu_worker"


def threads_bound_by_cpu_worker() -> bool:
    """Whether vLLM's CPU worker bound this process's threads (and stubbed torch's setter)."""
    import torch

    return getattr(torch.set_num_threads, "__module__", None) == _CPU_WORKER_MODULE


def quiet_set_default_torch_num_threads(original):
    @contextlib.contextmanager
    def set_default_torch_num_threads(num_threads: int | None = None) -> Iterator[None]:
        if threads_bound_by_cpu_worker():
            yield  # the binding fixed the count; vLLM's stand-in would only warn, twice
            return
        with original(num_threads):
            yield

    return set_default_torch_num_threads


def install() -> None:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.multimodal import encoder_budget
    from vllm.renderers import base

    from hippo_vllm.vllm.patching import patch_attribute

    for module in (base, encoder_budget):
        current = module.set_default_torch_num_threads
        original = getattr(current, "__wrapped_original__", current)
        replacement = quiet_set_default_torch_num_threads(original)
        replacement.__wrapped_original__ = original
        patch_attribute(module, "set_default_torch_num_threads", replacement)
