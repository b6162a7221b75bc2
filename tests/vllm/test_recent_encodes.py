"""The draft encoder's recent outputs: a byte-bounded LRU of host copies (pure logic)."""

from __future__ import annotations

import pytest
import torch

from hippo_vllm.vllm.draft.recent_encodes import RecentEncodes

CPU = torch.device("cpu")


def rows(value: float, n: int = 4) -> torch.Tensor:
    return torch.full((n, 8), value)  # 4 bytes x 8 x n


def test_outputs_are_kept_as_copies_and_handed_out_as_copies():
    recent = RecentEncodes(capacity_bytes=1 << 10)
    encoded = rows(1.0)
    recent.put("a", encoded)
    encoded.fill_(9.0)  # the encoder's tensor changes later: the kept copy does not
    got = recent.get("a", CPU)
    torch.testing.assert_close(got, rows(1.0))
    got.fill_(7.0)  # neither does a user of a handed-out copy change it
    torch.testing.assert_close(recent.get("a", CPU), rows(1.0))
    assert recent.get("b", CPU) is None


def test_least_recently_used_outputs_go_first_within_the_byte_budget():
    one = rows(0.0).numel() * 4
    recent = RecentEncodes(capacity_bytes=2 * one)
    recent.put("a", rows(1.0))
    recent.put("b", rows(2.0))
    assert recent.get("a", CPU) is not None  # a is now the most recent
    recent.put("c", rows(3.0))
    assert "b" not in recent and "a" in recent and "c" in recent
    assert recent.nbytes == 2 * one
    recent.put("a", rows(4.0))  # kept again: replaced, counted once
    assert recent.nbytes == 2 * one and len(recent) == 2
    torch.testing.assert_close(recent.get("a", CPU), rows(4.0))


def test_an_output_larger_than_the_budget_is_not_kept():
    recent = RecentEncodes(capacity_bytes=rows(0.0).numel() * 4)
    recent.put("small", rows(1.0))
    recent.put("large", rows(1.0, n=8))
    assert "large" not in recent and "small" in recent


def test_a_negative_budget_is_refused():
    with pytest.raises(ValueError, match="capacity_bytes must be >= 0, got -1"):
        RecentEncodes(capacity_bytes=-1)
