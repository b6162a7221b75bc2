"""The GPU worker process must not be switched into vLLM's CPU mode.

vLLM's CPU worker module imports ``vllm.v1.worker.cpu.shm`` first, which replaces
CUDA streams/events, ``torch.accelerator``'s memory functions, pinned memory and
vLLM's ``async_tensor_h2d`` for the whole process. vLLM imports ``worker_cls`` in
the worker process, so the GPU worker module, and everything the plugin imports
on a GPU, must leave those attributes alone. Each check runs in a fresh
interpreter, since the replacement cannot be undone in this one.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import hippo_vllm.vllm as integration

# Process-wide attributes vllm.v1.worker.cpu.shm replaces, as (module, attribute).
GUARDED = [
    ("torch", "Event"),
    ("torch.cuda", "Event"),
    ("torch.cuda", "Stream"),
    ("torch.cuda", "current_stream"),
    ("torch.cuda", "stream"),
    ("torch.cuda", "set_stream"),
    ("torch.accelerator", "synchronize"),
    ("torch.accelerator", "empty_cache"),
    ("torch.accelerator", "get_memory_info"),
    ("torch.Tensor", "pin_memory"),
    ("torch.Tensor", "record_stream"),
    ("vllm.utils.torch_utils", "async_tensor_h2d"),
]

CPU_ONLY_MODULES = {"hippo_vllm.vllm.seam.worker_cpu"}


def gpu_side_modules() -> list[str]:
    """Every hippo_vllm.vllm module a GPU process may import (all but the CPU worker)."""
    root = pathlib.Path(integration.__file__).parent
    modules = (
        ".".join(("hippo_vllm", "vllm", *p.relative_to(root).with_suffix("").parts))
        for p in root.rglob("*.py")
        if p.stem != "__init__"
    )
    return sorted(m for m in modules if m not in CPU_ONLY_MODULES)


def replaced_after(imports: list[str]) -> list[str]:
    """The guarded attributes whose identity changes when ``imports`` are imported
    and the plugin is registered, in a fresh interpreter."""
    return _import_and_register(imports)[0]


def _import_and_register(imports: list[str]) -> tuple[list[str], bool]:
    """(the guarded attributes replaced, whether CUDA got initialised), in a fresh interpreter."""
    script = textwrap.dedent(
        f"""
        import importlib, operator, torch, vllm.utils.torch_utils
        guarded = {GUARDED!r}
        def current():
            return {{f"{{m}}.{{a}}": getattr(operator.attrgetter(m.partition(".")[2])(torch)
                                          if m.startswith("torch.") else importlib.import_module(m), a)
                     for m, a in guarded}}
        before = current()
        for name in {imports!r}:
            importlib.import_module(name)
        from hippo_vllm.vllm.seam import plugin
        plugin.register()
        after = current()
        print("REPLACED:" + ",".join(k for k in before if before[k] is not after[k]))
        print("CUDA_INITIALIZED:" + str(torch.cuda.is_initialized()))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(integration.__file__).parents[2])}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    replaced = [l for l in lines if l.startswith("REPLACED:")][-1].removeprefix("REPLACED:")
    initialized = [l for l in lines if l.startswith("CUDA_INITIALIZED:")][-1].removeprefix("CUDA_INITIALIZED:")
    return [name for name in replaced.split(",") if name], initialized == "True"


def test_gpu_worker_and_plugin_modules_leave_cuda_and_torch_untouched():
    modules = gpu_side_modules()
    assert "hippo_vllm.vllm.seam.worker_gpu" in modules and "hippo_vllm.vllm.target.proposer" in modules
    replaced, cuda_initialized = _import_and_register(["hippo_vllm.vllm.seam.worker_gpu", *modules])
    assert replaced == []
    # The plugin registers in every vLLM process, the API server's and the engine
    # core's too: initialising CUDA there would break the forked workers.
    assert not cuda_initialized


def test_the_check_detects_the_cpu_worker_import():
    # Control: the CPU worker module does switch the process, and the check sees it.
    replaced = replaced_after(["hippo_vllm.vllm.seam.worker_cpu"])
    assert set(replaced) == {f"{m}.{a}" for m, a in GUARDED}
