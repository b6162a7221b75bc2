"""The draft in a process of its own: ``python -m hippo_vllm.vllm.placements.process_worker``.

Started by :class:`hippo_vllm.vllm.placements.process_client.RemoteDraft` in the target's
output-rank worker. It connects to the client's ipc socket, says hello, and then
serves messages in order (see :mod:`hippo_vllm.vllm.placements.wire`): ``init``
(the target's VllmConfig and the HippoConfig: it sets up a one-rank vLLM world of
its own and builds the draft worker), ``alloc`` (the draft's KV cache),
``work`` (one StepWork, answered by one StepResult with its tensors on the CPU),
``stall`` (sleep; tests of the client's deadlines use it) and ``shutdown``. A
message it cannot read is answered, never fatal: a step's work by a StepResult
whose step failed (that step goes on without drafts), anything else by a
``malformed`` report.

It is a plain subprocess rather than a ``multiprocessing`` child because vLLM's
worker and engine-core processes are daemonic, and a daemonic process may not
start ``multiprocessing`` children. Threads are bound before torch is imported
(``--cpu-cores``), so its thread pool is sized for them from the start; a GPU
is chosen by the client through ``CUDA_VISIBLE_DEVICES``, so the draft sees its
GPU as ``cuda:0``. A watchdog thread exits the process when its parent dies, so
no draft worker outlives the engine.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

PARENT_POLL_S = 0.5


def _watch_parent(parent_pid: int) -> None:
    """Exit at once when the process that started this one is gone."""

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(0)
            time.sleep(PARENT_POLL_S)

    threading.Thread(target=watch, daemon=True, name="hippo-draft-parent-watchdog").start()


def serve(endpoint: str) -> None:
    import pickle

    import torch
    import zmq

    from hippo_vllm.vllm.placements.bootstrap import allocate_kv_cache_within_device, start_draft_worker
    from hippo_vllm.vllm.placements.wire import Channel, MalformedMessage
    from hippo_vllm.vllm.protocol import DraftFailure, StepResult, result_on_host

    if "OMP_NUM_THREADS" in os.environ:  # bound in main(): size torch's pool for those cores
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    ctx = zmq.Context()
    channel = Channel(ctx, endpoint, bind=False)
    channel.send("hello", os.getpid())
    worker = None
    try:
        while True:
            try:
                kind, seq, payload = channel.recv()
            except MalformedMessage as bad:
                failure = DraftFailure.from_exception("", "draft worker: reading a message", bad)
                if bad.kind == "work" and bad.seq >= 0:
                    channel.send("result", StepResult(bad.seq, step_failure=failure), seq=bad.seq)
                else:
                    channel.send("malformed", failure)
                continue
            if kind == "work":
                # handle never raises; its kept rows may be on the draft's device.
                channel.send("result", result_on_host(worker.handle(payload)), seq=seq)
            elif kind == "init":
                vllm_config, hippo = pickle.loads(payload)  # the engine's own config, from the process that started us
                try:
                    worker = start_draft_worker(vllm_config, hippo)
                    channel.send("ready", (worker.kv_bytes_per_token, worker.block_size))
                except Exception as exc:  # noqa: BLE001 - reported to the client, which stays up
                    channel.send("error", DraftFailure.from_exception("", "draft worker start", exc))
                    return
            elif kind == "alloc":
                try:
                    channel.send("allocated", allocate_kv_cache_within_device(worker, payload))
                except Exception as exc:  # noqa: BLE001
                    channel.send("error", DraftFailure.from_exception("", "draft KV cache allocation", exc))
                    return
            elif kind == "stall":
                time.sleep(payload)
            elif kind == "shutdown":
                return
    finally:
        channel.close()
        ctx.term()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("endpoint", help="the client's zmq ipc endpoint")
    parser.add_argument("parent_pid", type=int)
    parser.add_argument("--cpu-cores", default="", help="comma-separated CPU core ids")
    args = parser.parse_args(argv)
    _watch_parent(args.parent_pid)
    if args.cpu_cores:
        from hippo_vllm.vllm.placements.bootstrap import bind_threads

        bind_threads([int(c) for c in args.cpu_cores.split(",")])
    serve(args.endpoint)
    sys.exit(0)


if __name__ == "__main__":
    main()
