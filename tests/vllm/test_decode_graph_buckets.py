"""Which batch sizes the draft's decode graphs are captured for, and which one a batch replays.

Pure logic (the capture and replay run on CUDA only: test_draft_gpu_memory_and_graphs).
"""

from __future__ import annotations

import pytest

from hippo_vllm.vllm.draft.decode_graphs import bucket_for, decode_buckets


def test_buckets_are_powers_of_two_up_to_the_largest_batch():
    assert decode_buckets(1) == [1]
    assert decode_buckets(6) == [1, 2, 4, 6]
    assert decode_buckets(8) == [1, 2, 4, 8]
    assert decode_buckets(256)[-3:] == [64, 128, 256] and len(decode_buckets(256)) == 9
    with pytest.raises(ValueError, match=r"max_batch=0"):
        decode_buckets(0)


def test_a_batch_replays_the_smallest_bucket_that_holds_it_and_none_above_the_largest():
    buckets = decode_buckets(6)
    assert [bucket_for(n, buckets) for n in range(1, 8)] == [1, 2, 4, 4, 6, 6, None]
