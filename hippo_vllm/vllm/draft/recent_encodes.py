"""The draft vision encoder's recent outputs, by multimodal item.

vLLM reuses an item's encoder output across requests that carry the same item
(its ``identifier`` hashes the processed input): a second question about the
same video does not run the target's vision encoder again. The draft's side does
the same for the draft's encoder, so a follow-up question costs the draft no
encode either: each output is kept, by the item's identifier, in host memory up
to ``RECENT_ENCODES_BYTES``, the least recently used going first.

The draft view of the new question is still built anew (the target's attention
to the video depends on the question); only the encoder's output is shared.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

# Host memory for recent draft encoder outputs: a video's rows times the draft's
# width (a 16k-token video through a 2048-wide draft in bfloat16 is 64 MiB).
RECENT_ENCODES_BYTES = 512 << 20


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class RecentEncodes:
    """Draft encoder outputs of recent items, least recently used out first."""

    def __init__(self, capacity_bytes: int = RECENT_ENCODES_BYTES):
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()  # on the host
        self.nbytes = 0

    def get(self, identifier: str, device: torch.device) -> torch.Tensor | None:
        """The item's output on ``device`` (a copy: the kept one never changes), or None."""
        kept = self._items.get(identifier)
        if kept is None:
            return None
        self._items.move_to_end(identifier)
        return kept.to(device, copy=True)

    def put(self, identifier: str, embeds: torch.Tensor) -> None:
        """Keep a copy of the item's output on the host (not when it alone exceeds the capacity)."""
        size = _nbytes(embeds)
        if size > self.capacity_bytes:
            return
        old = self._items.pop(identifier, None)
        if old is not None:
            self.nbytes -= _nbytes(old)
        self._items[identifier] = embeds.detach().to("cpu", copy=True)
        self.nbytes += size
        while self.nbytes > self.capacity_bytes:
            _, evicted = self._items.popitem(last=False)
            self.nbytes -= _nbytes(evicted)

    def __contains__(self, identifier: str) -> bool:
        return identifier in self._items

    def __len__(self) -> int:
        return len(self._items)
