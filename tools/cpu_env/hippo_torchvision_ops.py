"""Make the CUDA-built torchvision importable next to a CPU-only torch.

On CPU machines pip resolves torchvision to a CUDA build whose compiled extension
cannot load. torchvision tolerates that, but its ``_meta_registrations`` then
registers a fake kernel for ``torchvision::nms`` unguarded, and ``import
torchvision`` dies with "operator torchvision::nms does not exist". Without
torchvision, transformers' Qwen2-VL video processor refuses to load, so no video
request can be served.

The fix defines the missing operator schemas before torchvision's first import,
plus a slow pure-torch ``nms`` kernel so a stray call computes instead of crashing.
A one-line ``.pth`` file installs the finder below in every interpreter of the
environment (vLLM's engine and worker processes included). The finder fires only
when ``torchvision`` is first looked up and removes itself, so start-up cost is
nil. It must never raise during interpreter start.

This file is copied into site-packages by ``tools/setup_env.sh``; it is part of the
development/CPU environment, not of the ``hippo_vllm`` package.
"""

import sys

# Keeps the schema definitions alive for the lifetime of the process.
_TORCHVISION_LIB = None


def _greedy_nms(dets, scores, iou_threshold):
    """Reference greedy non-maximum suppression (boxes as x1, y1, x2, y2)."""
    import torch

    order = torch.argsort(scores, descending=True, stable=True)
    keep = []
    suppressed = torch.zeros(dets.shape[0], dtype=torch.bool)
    areas = (dets[:, 2] - dets[:, 0]).clamp(min=0) * (dets[:, 3] - dets[:, 1]).clamp(min=0)
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        x1 = torch.maximum(dets[i, 0], dets[:, 0])
        y1 = torch.maximum(dets[i, 1], dets[:, 1])
        x2 = torch.minimum(dets[i, 2], dets[:, 2])
        y2 = torch.minimum(dets[i, 3], dets[:, 3])
        inter = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
        iou = inter / (areas[i] + areas - inter).clamp(min=1e-12)
        suppressed |= iou > iou_threshold
    return torch.tensor(keep, dtype=torch.long)


def _torchvision_ops_missing():
    import torch

    try:
        torch.ops.torchvision.nms
    except (AttributeError, RuntimeError):
        return True
    return False


def define_torchvision_schemas():
    """Define ``torchvision::nms`` / ``qnms`` if no extension provided them."""
    global _TORCHVISION_LIB
    if _TORCHVISION_LIB is not None or not _torchvision_ops_missing():
        return
    import torch

    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.impl("nms", _greedy_nms, "CPU")
    _TORCHVISION_LIB = lib


class _TorchvisionFirstImportFinder:
    """Runs the schema definition once, just before torchvision is imported."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torchvision":
            return None
        try:
            sys.meta_path.remove(self)
        except ValueError:
            pass
        try:
            define_torchvision_schemas()
        except Exception as exc:  # never break the import that triggered us
            print(f"hippo_torchvision_ops: could not define schemas: {exc!r}", file=sys.stderr)
        return None  # let the regular finders import torchvision


def install():
    try:
        if "torchvision" in sys.modules:
            return
        if not any(isinstance(f, _TorchvisionFirstImportFinder) for f in sys.meta_path):
            sys.meta_path.insert(0, _TorchvisionFirstImportFinder())
    except Exception:
        pass


install()
