"""A draft worker process that fails on purpose, for the client's fault tests.

``python faulty_draft_worker.py FAULT ENDPOINT PARENT_PID``, started by a
RemoteDraft whose worker command names this file. It speaks the real wire
(``hippo_vllm.vllm.placements.wire``) and fails in one way:

- ``exit_after_hello``: connects, says hello, exits before reading its init;
- ``silent_after_hello``: connects, says hello, reads its init and never answers.
"""

from __future__ import annotations

import os
import sys
import time

import zmq

from hippo_vllm.vllm.placements.wire import Channel


def main() -> None:
    fault, endpoint = sys.argv[1], sys.argv[2]
    channel = Channel(zmq.Context(), endpoint, bind=False)
    channel.send("hello", os.getpid())
    if fault == "exit_after_hello":
        time.sleep(0.5)  # the hello leaves; the client's init then finds no peer
        os._exit(3)
    if fault == "silent_after_hello":
        channel.recv()
        time.sleep(3600)
    raise SystemExit(f"unknown fault {fault!r}")


if __name__ == "__main__":
    main()
