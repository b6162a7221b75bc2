"""The one way hippo_vllm changes an attribute of vLLM.

Every patch goes through :func:`patch_attribute`, :func:`patch_instance_attribute`
or :func:`temporarily_patched` and is named in :mod:`hippo_vllm.vllm.patch_index`
(a test keeps the two in sync, and another checks that an engine applies exactly
the indexed patches: :func:`applied_patches` records every target applied).
Patching is idempotent: vLLM loads plugins once per process but may call
``register()`` again after a fork, and a second application must neither wrap the
wrapper nor fail. Patching an attribute that someone else already replaced is
refused, because stacking on an unknown wrapper is how plugins silently break
each other.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any

# target ("module:Qualified.attr") -> original value, for every lasting patch applied
# here: what lets a second application tell "ours" from "someone else's".
_APPLIED: dict[str, Any] = {}
_MARK = "__hippo_vllm_patch__"
_EVER_APPLIED: set[str] = set()  # every target this process patched, temporary ones included


def applied_patches() -> frozenset[str]:
    """The targets patched in this process so far (lasting, per-instance and temporary)."""
    return frozenset(_EVER_APPLIED)


class PatchConflict(RuntimeError):
    """The attribute to patch was already replaced by another party."""


def target_name(owner: Any, name: str) -> str:
    """"module:Class.attr" for a class attribute, "module:attr" for a module global."""
    if isinstance(owner, types.ModuleType):
        return f"{owner.__name__}:{name}"
    return f"{owner.__module__}:{owner.__qualname__}.{name}"


def patch_attribute(owner: Any, name: str, replacement: Any) -> str:
    """Replace ``owner.name`` for the rest of the process; returns the target name."""
    target = target_name(owner, name)
    current = getattr(owner, name)
    if getattr(current, _MARK, None) == target:
        return target  # already ours
    if target in _APPLIED:
        raise PatchConflict(f"{target} was replaced after hippo_vllm patched it")
    setattr(replacement, _MARK, target)
    _APPLIED[target] = current
    setattr(owner, name, replacement)
    _EVER_APPLIED.add(target)
    return target


def patch_instance_attribute(instance: Any, name: str, replacement: Any, target: str) -> str:
    """Replace ``instance.name`` on this one object; its class and other instances keep theirs.

    ``target`` is the patch index's name for the patch (the objects are only
    reachable through other objects, so no import path names them). Refused if
    the instance already carries a replacement, another party's or a previous one
    of hippo_vllm's (two wrappers on one object would both run).
    """
    current = vars(instance).get(name)
    if current is not None:
        owner = "hippo_vllm" if getattr(current, _MARK, None) == target else "another party"
        raise PatchConflict(f"{target}: {name} of {instance!r} was already replaced by {owner}")
    setattr(replacement, _MARK, target)
    setattr(instance, name, replacement)
    _EVER_APPLIED.add(target)
    return target


@contextlib.contextmanager
def temporarily_patched(owner: Any, name: str, replacement: Any) -> Iterator[str]:
    """Replace ``owner.name`` only inside the ``with`` block (restored on exit)."""
    target = target_name(owner, name)
    original = getattr(owner, name)
    setattr(owner, name, replacement)
    _EVER_APPLIED.add(target)
    try:
        yield target
    finally:
        setattr(owner, name, original)
