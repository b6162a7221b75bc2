"""The draft worker's transport: a step's round trip and a 16k-token video hand-off.

Compares the wire the draft worker uses (vLLM's ZMQ socket helpers and msgpack
encoder, tensors as zero-copy frames: ``hippo_vllm.vllm.placements.wire``) with
the framing it replaced, one pickled ``(kind, payload)`` per message over the
same kind of ZMQ PAIR socket, reproduced here as the baseline. A peer process
plays the draft worker: it reads each message whole (decoded into records and
tensors) and answers with a small StepResult. Measured:

- a step's round trip: chunk orders for 8 requests out, 8 chunks back;
- the hand-off of one request's prompt with a 16,384-token video at Qwen2.5-VL's
  geometry (65,536 patches of 3·2·14·14 values, bf16: 151 MiB) and its s_attn,
  from the send to the answer.

Median of ``--repeats`` runs each, on this machine's CPU; run it with nothing else
busy. ``--json`` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import pickle
import platform
import statistics
import time

import torch
import zmq

VIDEO_TOKENS = 16_384
PATCH_VALUES = 3 * 2 * 14 * 14  # channels x temporal patch x 14 x 14
MERGE = 4  # 2x2 patches per video token


def step_work(seq: int):
    from hippo_vllm.vllm.protocol import ChunkOrder, StepWork

    return StepWork(seq, chunks=[ChunkOrder(f"r{i}", 40 + seq, [seq % 100], 5) for i in range(8)])


def video_hand_off(seq: int, video_tokens: int):
    from vllm.multimodal.inputs import (
        MultiModalBatchedField,
        MultiModalFeatureSpec,
        MultiModalFieldElem,
        MultiModalFlatField,
        MultiModalKwargsItem,
        PlaceholderRange,
    )

    from hippo_vllm.vllm.protocol import DraftPrompt, Prefill, StepWork

    patches = video_tokens * MERGE
    pixels = torch.randn(patches, PATCH_VALUES).to(torch.bfloat16)
    item = MultiModalKwargsItem({
        "pixel_values_videos": MultiModalFieldElem(
            data=pixels, field=MultiModalFlatField(slices=[slice(0, patches)], dim=0)),
        "video_grid_thw": MultiModalFieldElem(data=torch.tensor([16, 64, 64]), field=MultiModalBatchedField()),
    })
    prompt_len = video_tokens + 64
    feature = MultiModalFeatureSpec(data=item, modality="video", identifier="clip",
                                    mm_position=PlaceholderRange(offset=32, length=video_tokens))
    prompt = DraftPrompt("r0", list(range(prompt_len)), [feature],
                         torch.arange(prompt_len).expand(3, -1).clone(), 0)
    return StepWork(seq, prefills=[Prefill("r0", prompt, [torch.rand(video_tokens)])])


def answer(seq: int):
    from hippo_vllm.vllm.protocol import StepResult

    return StepResult(seq, chunks={f"r{i}": [1, 2, 3, 4, 5] for i in range(8)})


# -- the two wires, each with the same three calls ----------------------------------------


class PickleWire:
    """The replaced framing: one pickled (kind, payload) per message."""

    def __init__(self, ctx, path: str, bind: bool):
        self.socket = ctx.socket(zmq.PAIR)
        (self.socket.bind if bind else self.socket.connect)(path)

    def send(self, kind: str, payload, seq: int = -1) -> None:
        self.socket.send(pickle.dumps((kind, payload), protocol=pickle.HIGHEST_PROTOCOL), copy=False)

    def recv(self):
        kind, payload = pickle.loads(self.socket.recv(copy=False).buffer)
        return kind, getattr(payload, "seq", -1), payload


class VllmWire:
    """hippo's wire: vLLM's ZMQ helpers and msgpack encoder."""

    def __init__(self, ctx, path: str, bind: bool):
        from hippo_vllm.vllm.placements.wire import Channel

        self.channel = Channel(ctx, path, bind=bind)

    def send(self, kind: str, payload, seq: int = -1) -> None:
        self.channel.send(kind, payload, seq=seq)

    def recv(self):
        return self.channel.recv()


WIRES = {"pickle over PAIR (before)": PickleWire, "vLLM ZMQ + msgpack (now)": VllmWire}


def peer(wire_name: str, path: str) -> None:
    """The draft worker's part: read each message whole, answer with a small result."""
    torch.set_num_threads(1)
    ctx = zmq.Context()
    wire = WIRES[wire_name](ctx, path, bind=False)
    while True:
        kind, seq, payload = wire.recv()
        if kind == "shutdown":
            return
        wire.send("result", answer(payload.seq), seq=payload.seq)


def measure(wire_name: str, repeats: int, video_tokens: int) -> dict[str, float]:
    from hippo_vllm.vllm.placements.wire import Channel

    ctx = zmq.Context()
    path = Channel.new_path()
    wire = WIRES[wire_name](ctx, path, bind=True)
    worker = multiprocessing.get_context("spawn").Process(target=peer, args=(wire_name, path))
    worker.start()
    try:
        def round_trip(work) -> float:
            start = time.perf_counter()
            wire.send("work", work, seq=work.seq)
            kind, seq, _ = wire.recv()
            assert kind == "result" and seq == work.seq
            return time.perf_counter() - start

        for seq in range(20):  # warm-up: imports, socket set-up
            round_trip(step_work(seq))
        steps = [round_trip(step_work(seq)) for seq in range(100, 100 + 50 * repeats)]
        videos = []
        for seq in range(repeats):
            work = video_hand_off(1000 + seq, video_tokens)  # built outside the timed part
            videos.append(round_trip(work))
        wire.send("shutdown", None)
    finally:
        worker.join(30)
        if worker.is_alive():
            worker.kill()
    return {"step_round_trip_ms": 1000 * statistics.median(steps),
            "video_hand_off_ms": 1000 * statistics.median(videos)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--video-tokens", type=int, default=VIDEO_TOKENS)
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats={args.repeats}: must be >= 1")
    if args.video_tokens < 1:
        parser.error(f"--video-tokens={args.video_tokens}: must be >= 1")
    video_mib = args.video_tokens * MERGE * PATCH_VALUES * 2 / 2**20
    print(f"draft transport on {platform.processor() or platform.machine()}, torch {torch.__version__}; "
          f"video hand-off: {args.video_tokens} tokens, {video_mib:.0f} MiB of bf16 pixels")
    results = {}
    for name in WIRES:
        results[name] = measure(name, args.repeats, args.video_tokens)
        r = results[name]
        print(f"  {name:28s} step round trip {r['step_round_trip_ms']:7.3f} ms   "
              f"video hand-off {r['video_hand_off_ms']:8.1f} ms", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"video_tokens": args.video_tokens, "video_mib": video_mib, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
