"""Packing the draft's per-request work into forwards: consecutive, within a row budget."""

from __future__ import annotations

from hippo_vllm.vllm.draft.batching import consecutive_groups


def test_groups_fill_up_to_the_budget_in_order_and_a_larger_item_goes_alone():
    assert consecutive_groups([3, 4, 2, 9, 1, 1], lambda n: n, 8) == [[3, 4], [2], [9], [1, 1]]
    assert consecutive_groups([8, 8], lambda n: n, 8) == [[8], [8]]
    assert consecutive_groups([], lambda n: n, 8) == []
