"""The wire between the target's side and a draft worker process, from vLLM's own toolbox.

One ZMQ PAIR socket over ipc per worker, made by vLLM's ``make_zmq_socket`` at a
path from ``get_open_zmq_ipc_path``. A message is a multipart: a msgpack header
``[kind, seq]`` and the payload as vLLM's ``MsgpackEncoder`` writes it, whose
tensors above its size threshold travel as frames of their own, without a copy
into the message (a request's video inputs, sent once, are most of the bytes).
Each kind has one payload type (``PAYLOADS``), decoded typed by vLLM's
``MsgpackDecoder``: the plain records of :mod:`hippo_vllm.vllm.protocol` per
step, and a few control messages (see ``process_worker``). The one pickle is
``init``'s: the engine's own VllmConfig, handed to the process it started.

Only CPU tensors cross: :func:`check_on_host` walks every payload before it is
sent and refuses a tensor on a device (it would be written with its device and
could not be read by a process that sees other GPUs, or none).

No send waits without bound: a send that cannot be queued within ``send_timeout_s``
(no peer: a worker that died after its hello; a full queue) raises ``zmq.Again``,
which the client takes as a lost worker. A message that cannot be read raises
:class:`MalformedMessage` with its header when that much could be read, so the
reader reports that one message and goes on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import msgspec
import torch
import zmq

from hippo_vllm.vllm.protocol import DraftFailure, StepResult, StepWork

NO_SEQ = -1  # the header's seq of a control message
HEADER = msgspec.msgpack.Encoder()  # a message's first frame: [kind, seq]

# The payload type of each kind of message.
PAYLOADS: dict[str, Any] = {
    "hello": int,  # worker -> client: its pid, once connected
    "init": bytes,  # client -> worker: pickled (VllmConfig, HippoConfig)
    "ready": tuple[float, int],  # worker: the draft is loaded (kv bytes per token, block size)
    "alloc": int,  # client: allocate the draft's KV cache (blocks)
    "allocated": int,
    "work": StepWork,  # client: one target step's drafting work
    "result": StepResult,  # worker: its answer (same seq)
    "error": DraftFailure,  # worker: the start failed; it exits
    "malformed": DraftFailure,  # worker: a message it could not read (it goes on)
    "stall": float,  # client: sleep this long before the next message (tests of the deadlines)
    "shutdown": type(None),
}


class MalformedMessage(ValueError):
    """A message that could not be read; ``kind`` and ``seq`` as far as its header told."""

    def __init__(self, kind: str | None, seq: int, cause: BaseException):
        super().__init__(f"a malformed {kind or 'unknown'} message (seq {seq}): {type(cause).__name__}: {cause}")
        self.kind, self.seq, self.cause = kind, seq, cause


def check_on_host(payload: Any, path: str = "message") -> None:
    """Raise ValueError naming the first tensor of ``payload`` that is not on the CPU."""
    if isinstance(payload, torch.Tensor):
        if payload.device.type != "cpu":
            raise ValueError(
                f"{path} is a tensor on {payload.device}; only CPU tensors cross to or from a draft "
                "worker (move it with .cpu() first)"
            )
    elif dataclasses.is_dataclass(payload) and not isinstance(payload, type):
        for field in dataclasses.fields(payload):
            check_on_host(getattr(payload, field.name), f"{path}.{field.name}")
    elif isinstance(payload, (list, tuple)):
        for i, item in enumerate(payload):
            check_on_host(item, f"{path}[{i}]")
    elif isinstance(payload, Mapping):  # also vLLM's MultiModalKwargsItem (a UserDict)
        for key, item in payload.items():
            check_on_host(item, f"{path}[{key!r}]")


class Channel:
    """Typed messages over one PAIR socket (see the module's docstring)."""

    def __init__(self, ctx: zmq.Context, path: str, *, bind: bool, send_timeout_s: float | None = None):
        from vllm.utils.network_utils import make_zmq_socket
        from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

        self.path, self.bound = path, bind
        self.socket = make_zmq_socket(ctx, path, zmq.PAIR, bind=bind, linger=0)
        if send_timeout_s is not None:
            self.socket.setsockopt(zmq.SNDTIMEO, max(1, int(send_timeout_s * 1000)))
        self._encoder = MsgpackEncoder()
        self._header_decoder = msgspec.msgpack.Decoder(tuple[str, int])
        self._decoders = {kind: MsgpackDecoder(t) for kind, t in PAYLOADS.items()}

    @staticmethod
    def new_path() -> str:
        from vllm.utils.network_utils import get_open_zmq_ipc_path

        return get_open_zmq_ipc_path()

    def send(self, kind: str, payload: Any = None, seq: int = NO_SEQ, block: bool = True) -> None:
        """Raises ``zmq.Again`` when the message cannot be queued (at once if not ``block``,
        else within the socket's send timeout), ValueError for a device tensor."""
        if kind not in PAYLOADS:
            raise ValueError(f"unknown message kind {kind!r}; known: {sorted(PAYLOADS)}")
        check_on_host(payload, kind)
        frames = [HEADER.encode((kind, seq)), *self._encoder.encode(payload)]
        self.socket.send_multipart(frames, flags=0 if block else zmq.NOBLOCK, copy=False)

    def recv(self) -> tuple[str, int, Any]:
        """``(kind, seq, payload)``; raises :class:`MalformedMessage` for one that cannot be read."""
        frames = self.socket.recv_multipart(copy=False)
        kind, seq = None, NO_SEQ
        try:
            kind, seq = self._header_decoder.decode(frames[0].buffer)
            decoder = self._decoders[kind]
            return kind, seq, decoder.decode([frame.buffer for frame in frames[1:]])
        except Exception as exc:  # noqa: BLE001 - one bad message, reported by the reader
            raise MalformedMessage(kind if kind in PAYLOADS else None, seq, exc) from exc

    def poll(self, timeout_s: float) -> bool:
        """Whether a message is waiting, after at most ``timeout_s`` seconds."""
        return bool(self.socket.poll(max(0, int(timeout_s * 1000))))

    def close(self) -> None:
        self.socket.close(linger=0)
        if self.bound and self.path.startswith("ipc://"):  # the binding side owns the socket file
            with contextlib.suppress(OSError):  # already gone
                os.unlink(self.path[len("ipc://"):])
