"""Packing the draft's per-request work into fewer forwards, within a row budget."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


def consecutive_groups(items: Sequence[T], rows_of: Callable[[T], int], max_rows: int) -> list[list[T]]:
    """``items`` in order, cut into groups whose rows together stay within ``max_rows``;
    an item larger than that forms a group of its own."""
    groups: list[list[T]] = []
    rows = max_rows + 1
    for item in items:
        n = rows_of(item)
        if groups and rows + n <= max_rows:
            groups[-1].append(item)
            rows += n
        else:
            groups.append([item])
            rows = n
    return groups
