"""The wire to a draft worker (vLLM's ZMQ and msgpack helpers) and the restart budget, as pure logic.

Both ends of a real PAIR socket in this process: typed records arrive equal, with
their tensors as frames of their own; a device tensor is refused before it leaves;
a malformed message is reported with what its header told; a send without a peer
gives up at its deadline instead of waiting forever.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import zmq

from hippo_vllm.vllm.placements.supervised import RestartBudget
from hippo_vllm.vllm.placements.wire import HEADER, Channel, MalformedMessage, check_on_host
from hippo_vllm.vllm.protocol import (
    ChunkOrder,
    DraftFailure,
    DraftPrompt,
    Prefill,
    Release,
    StepResult,
    StepWork,
    ViewReport,
)


@pytest.fixture
def pair():
    ctx = zmq.Context()
    path = Channel.new_path()
    client = Channel(ctx, path, bind=True, send_timeout_s=0.2)
    worker = Channel(ctx, path, bind=False)
    yield client, worker
    worker.close()
    client.close()
    ctx.term()


def a_step(seq: int = 7) -> StepWork:
    g = torch.Generator().manual_seed(seq)
    prompt = DraftPrompt("r", list(range(40)), [], torch.arange(40).expand(3, -1).clone(), -5)
    attention = [torch.rand(300, generator=g), None]
    return StepWork(seq, releases=[Release("old", True)], prefills=[Prefill("r", prompt, attention)],
                    chunks=[ChunkOrder("r", 2, [5, 6], 3)])


def assert_same(a, b) -> None:
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif dataclasses.is_dataclass(a):
        for field in dataclasses.fields(a):
            assert_same(getattr(a, field.name), getattr(b, field.name))
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def test_records_arrive_equal_with_their_tensors_as_frames_of_their_own(pair):
    client, worker = pair
    work = a_step()
    client.send("work", work, seq=work.seq)
    assert worker.poll(5)
    frames = worker.socket.recv_multipart(copy=False)
    assert len(frames) >= 3  # header, body, and at least the 300-float s_attn on its own
    worker.socket.send_multipart(frames)  # echo it back, unread
    assert client.poll(5)
    kind, seq, received = client.recv()
    assert (kind, seq) == ("work", 7)
    assert_same(received, work)

    view = ViewReport("r", torch.tensor([0, 3, 9]), 40, 30, 3, 0.01, True)
    failure = DraftFailure("r", "draft prefill", "ValueError", "boom", "trace")
    result = StepResult(7, chunks={"r": [1, 2, 3]}, views=[view], no_room=["q"], failures=[failure])
    worker.send("result", result, seq=7)
    assert client.poll(5)
    kind, seq, received = client.recv()
    assert (kind, seq) == ("result", 7)
    assert_same(received, result)


def test_a_device_tensor_is_refused_before_it_leaves(pair):
    client, _ = pair
    work = a_step()
    work.prefills[0].attention[1] = torch.empty(4, device="meta")
    with pytest.raises(ValueError, match=r"work\.prefills\[0\]\.attention\[1\] is a tensor on meta"):
        client.send("work", work, seq=work.seq)
    check_on_host(a_step())  # the same message on the CPU passes


def test_malformed_messages_are_reported_with_their_header(pair):
    client, worker = pair
    client.socket.send_multipart([HEADER.encode(("work", 3)), b"\xc1"])
    assert worker.poll(5)
    with pytest.raises(MalformedMessage) as bad:
        worker.recv()
    assert (bad.value.kind, bad.value.seq) == ("work", 3)
    client.socket.send_multipart([b"\xc1"])
    assert worker.poll(5)
    with pytest.raises(MalformedMessage) as bad:
        worker.recv()
    assert (bad.value.kind, bad.value.seq) == (None, -1)
    with pytest.raises(ValueError, match="unknown message kind 'nonsense'"):
        client.send("nonsense")


def test_a_send_without_a_peer_gives_up_at_its_deadline():
    ctx = zmq.Context()
    lonely = Channel(ctx, Channel.new_path(), bind=True, send_timeout_s=0.1)
    try:
        with pytest.raises(zmq.Again):
            lonely.send("init", b"config")
    finally:
        lonely.close()
        ctx.term()


def test_the_restart_budget_counts_restarts_per_window():
    budget = RestartBudget(max_restarts=2, window_s=600.0)
    assert budget.take(0.0) and budget.take(10.0)
    assert not budget.take(20.0)  # a third within 600 s: a crash loop
    assert budget.take(600.0)  # the first has left the window
    assert not budget.take(605.0)
    # Rare faults over a long life: never refused.
    rare = RestartBudget(max_restarts=1, window_s=600.0)
    assert all(rare.take(hour * 3600.0) for hour in range(100))
    assert not RestartBudget(max_restarts=0, window_s=600.0).take(0.0)
