"""Scoring demo: which video tokens would the HIPPO draft keep?

Writes a real mp4 (moving coloured objects over a textured static background),
decodes it, cuts it into Qwen2.5-VL's token grid (2 frames x 28 x 28 pixels per LLM
token), scores every token with the holistic score of ``hippo_vllm.core`` and keeps
10% of them. Each token's embedding here is its raw pixel patch, so the demo runs
without a model; in serving, the draft's own vision encoder provides the
embeddings and the target's prefill adds the attention signal.

Run with ``make scoring-demo`` (or ``.venv/bin/python examples/scoring_demo.py``).
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile
import time

import torch

from hippo_vllm.core import (
    VideoGrid,
    holistic_scores,
    position_bias,
    select_tokens,
    select_uniform,
    spatial_scores,
    temporal_scores,
)
from hippo_testbed.videos import load_video, write_synthetic_video

PATCH = 28  # pixels per LLM token side: 14-pixel ViT patches merged 2x2
FRAMES_PER_TOKEN = 2  # Qwen2.5-VL's temporal patch


def pixel_patch_embeddings(frames: torch.Tensor) -> tuple[torch.Tensor, VideoGrid]:
    """[T, H, W, 3] uint8 -> ([t*h*w, 2*28*28*3] float, grid), in vLLM's token order."""
    t_frames, height, width, _ = frames.shape
    t, h, w = t_frames // FRAMES_PER_TOKEN, height // PATCH, width // PATCH
    x = frames[: t * FRAMES_PER_TOKEN, : h * PATCH, : w * PATCH].float() / 255.0
    x = x.reshape(t, FRAMES_PER_TOKEN, h, PATCH, w, PATCH, 3)
    x = x.permute(0, 2, 4, 1, 3, 5, 6).reshape(t * h * w, -1)
    return x, VideoGrid(t, h, w)


def kept_map(selected: torch.Tensor, grid: VideoGrid) -> list[str]:
    """One text row per token row, frames side by side: '#' kept, '.' pruned."""
    mask = torch.zeros(grid.num_tokens, dtype=torch.bool)
    mask[selected] = True
    mask = mask.reshape(grid.t, grid.h, grid.w)
    return [
        "  ".join("".join("#" if mask[f, r, c] else "." for c in range(grid.w)) for f in range(grid.t))
        for r in range(grid.h)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--video", type=pathlib.Path, help="an mp4 to score (default: a generated one)")
    parser.add_argument("--keep-ratio", type=float, default=0.1)
    parser.add_argument("--frames", type=int, default=16)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = args.video
        if path is None:
            path = pathlib.Path(tmp) / "demo.mp4"
            write_synthetic_video(path, num_frames=args.frames, size=(224, 224), fps=8, seed=0)
        frames, metadata = load_video(path, num_frames=args.frames)
    embeds, grid = pixel_patch_embeddings(torch.from_numpy(frames))
    print(f"video: {path.name if args.video else 'generated mp4'}, {frames.shape[0]} frames "
          f"{frames.shape[2]}x{frames.shape[1]} -> token grid t={grid.t} h={grid.h} w={grid.w} "
          f"({grid.num_tokens} tokens)")

    start = time.perf_counter()
    scores = holistic_scores(embeds, grid, attn=None)
    kept = select_tokens(scores, grid, args.keep_ratio)
    elapsed_ms = (time.perf_counter() - start) * 1e3

    print(f"kept {kept.numel()} of {grid.num_tokens} tokens (keep_ratio {args.keep_ratio}) "
          f"in {elapsed_ms:.1f} ms; '#' = seen by the draft, one block per token-frame:")
    for row in kept_map(kept, grid):
        print("  " + row)

    temp, spa = temporal_scores(embeds, grid), spatial_scores(embeds, grid)
    uniform = select_uniform(grid, args.keep_ratio)
    print(f"mean s_temp of kept tokens {temp[kept].mean():.3f} vs all {temp.mean():.3f}; "
          f"mean s_spa kept {spa[kept].mean():.4f} vs all {spa.mean():.4f}")
    print(f"boundary selection ratio (1.0 = no border bias): holistic {position_bias(kept, grid):.2f}, "
          f"uniform {position_bias(uniform, grid):.2f}")


if __name__ == "__main__":
    main()
