"""The thin framing between the target's side and a draft worker process.

One zmq PAIR socket over ipc per worker; each message is one pickled
``(kind, payload)`` tuple. Payloads are the plain records of
:mod:`hippo_vllm.vllm.protocol` (per step only token ids travel) plus a
few control messages (see draft_worker_process).
"""

from __future__ import annotations

import pickle
from typing import Any

import zmq


class Messenger:
    """Pickled ``(kind, payload)`` messages over one zmq socket."""

    def __init__(self, socket: zmq.Socket):
        self.socket = socket

    def send(self, kind: str, payload: Any = None, block: bool = True) -> None:
        """Raises ``zmq.Again`` when ``block`` is False and the peer's queue is full."""
        data = pickle.dumps((kind, payload), protocol=pickle.HIGHEST_PROTOCOL)
        self.socket.send(data, flags=0 if block else zmq.NOBLOCK, copy=False)

    def recv(self) -> tuple[str, Any]:
        return pickle.loads(self.socket.recv(copy=False).buffer)

    def poll(self, timeout_s: float) -> bool:
        """Whether a message is waiting, after at most ``timeout_s`` seconds."""
        return bool(self.socket.poll(max(0, int(timeout_s * 1000))))
