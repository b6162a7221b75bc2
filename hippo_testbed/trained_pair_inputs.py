"""The trained pair's training inputs: each sample's video as vLLM serves it, and its labels.

A sample's frames are encoded as an mp4 (`TaskSample.write_mp4`), decoded by
`videos.load_video` (vLLM's OpenCV loader's frame choice and metadata), and passed
through the checkpoint's own HF processor with that metadata, as vLLM's Qwen2.5-VL
processor does. Beside the question and answer token ids, each sample carries
auxiliary labels per video token and per patch, for the vision tower's first stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hippo_testbed import processor, video_task
from hippo_testbed.prompts import video_chat_prompt
from hippo_testbed.trained_pair import MERGE_SIZE, NUM_FRAMES
from hippo_testbed.videos import load_video

if TYPE_CHECKING:  # torch is imported where it is used: importing this module stays cheap
    import torch


@dataclass
class VideoInputs:
    """One sample as the model sees it: pixels, grid and every question's token ids."""

    pixel_values: "torch.Tensor"          # [patches, 1176]
    grid_thw: "torch.Tensor"              # [1, 3]
    second_per_grid: float
    prompts: list[list[int]]              # per question, video placeholder expanded
    answers: list[list[int]]              # per question: answer tokens + <|im_end|>
    token_targets: "torch.Tensor"         # [video tokens, len(TOKEN_AUX_CLASSES)], see `token_targets`
    patch_targets: "torch.Tensor"         # [patches, len(PATCH_AUX_CLASSES)], see `patch_targets`


def decoded_video(sample, workdir: Path) -> tuple:
    """`(frames, metadata)` of `sample`'s mp4, decoded as vLLM's OpenCV loader does."""
    path = sample.write_mp4(workdir / f"{sample.seed}_{sample.kind}.mp4")
    try:
        return load_video(path, NUM_FRAMES)
    finally:
        path.unlink(missing_ok=True)


def hf_video_metadata(metadata: dict) -> dict:
    """The loader's metadata as vLLM hands it to the HF processor (no do_sample_frames)."""
    return {k: v for k, v in metadata.items() if k != "do_sample_frames"}


def video_inputs(proc, sample, workdir: Path) -> VideoInputs:
    """Process `sample`'s decoded mp4 once; expand each question's prompt like the processor.

    The first question goes through the full processor and its ids are checked
    against the manual expansion, so a processor change cannot slip through.
    """
    tok = proc.tokenizer
    frames, metadata = decoded_video(sample, workdir)
    prompts = [video_chat_prompt(tok, qa.question) for qa in sample.qa]
    out = proc(text=[prompts[0]], videos=[frames], video_metadata=[hf_video_metadata(metadata)],
               return_tensors="pt")
    pad = tok.convert_tokens_to_ids("<|video_pad|>")
    merge = proc.video_processor.merge_size
    num_video_tokens = int(out["video_grid_thw"].prod()) // merge ** 2
    expanded = []
    for prompt in prompts:
        ids = []
        for token in tok(prompt).input_ids:
            ids.extend([pad] * num_video_tokens if token == pad else [token])
        expanded.append(ids)
    if expanded[0] != out["input_ids"][0].tolist():
        raise RuntimeError("manual video placeholder expansion differs from the HF processor's")
    end = tok.convert_tokens_to_ids("<|im_end|>")
    return VideoInputs(
        pixel_values=out["pixel_values_videos"], grid_thw=out["video_grid_thw"],
        second_per_grid=float(out["second_per_grid_ts"][0]), prompts=expanded,
        answers=[tok(qa.answer).input_ids + [end] for qa in sample.qa],
        token_targets=token_targets(sample, metadata["frames_indices"], out["video_grid_thw"][0].tolist(), merge),
        patch_targets=patch_targets(sample, metadata["frames_indices"], out["video_grid_thw"][0].tolist(), merge),
    )


# Auxiliary labels (training only, through linear heads that are not saved), all
# local: per merged video token (what the 28x28-pixel token shows: the colour of the
# object covering it, the object's shape on the token that holds its centre, the
# mover's direction where it is the mover, its quadrant of the frame, whether it
# shows an object at all) and per 14x14 patch before the merger (colour, mover
# direction). Shape is labelled on the centre token alone: a token at an object's
# edge shows too little of it to tell, and labelling those too was measured to learn
# shape slower. They give the vision
# tower a dense signal, so it learns to see in a few hundred steps what the answer
# tokens alone would teach it far slower; the language model then learns, on the
# frozen tower's features, which tokens each question must read. Scene-wide labels
# on a pooled token were tried and slow the tower down.
_COLORS = list(video_task.COLORS)
_DIRECTIONS = list(video_task.DIRECTIONS)
IGNORE = -100  # cross_entropy's ignore_index: no label here
TOKEN_AUX_CLASSES = {"color": 1 + len(_COLORS), "shape": 1 + len(video_task.SHAPES),
                     "mover_direction": 1 + len(_DIRECTIONS), "quadrant": len(video_task.QUADRANTS),
                     "object": 2}
PATCH_AUX_CLASSES = {"color": 1 + len(_COLORS), "mover_direction": 1 + len(_DIRECTIONS)}
_MIN_TOKEN_PIXELS = 6    # object pixels (over the token's two frames) that make it the token's object
_MIN_PATCH_PIXELS = 32   # the same for a 14x14 patch (of 392 pixels over two frames)


def _cell_object(sample, masks, y0: int, y1: int, x0: int, x1: int, min_pixels: int):
    """The object that covers the cell most, if it covers at least `min_pixels` of it."""
    import numpy as np

    region = masks[:, y0:y1, x0:x1]
    pixels = np.bincount(region.ravel().astype(np.int64), minlength=len(sample.objects) + 1)[1:]
    return sample.objects[int(pixels.argmax())] if pixels.max() >= min_pixels else None


def _colour_and_direction(sample, obj) -> list[int]:
    """[colour, mover direction] labels (1-based; direction 0 for a still object), or
    [0, IGNORE] for background."""
    if obj is None:
        return [0, IGNORE]
    direction = 1 + _DIRECTIONS.index(sample.facts.direction) if obj.moving else 0
    return [1 + _COLORS.index(obj.color), direction]


def token_targets(sample, frame_indices: list[int], grid_thw: list[int], merge: int = MERGE_SIZE) -> "torch.Tensor":
    """[t * h * w merged tokens, len(TOKEN_AUX_CLASSES)] labels, tokens in the vision tower's output order."""
    import torch

    t_grid, h_grid, w_grid = grid_thw
    rows_m, cols_m = h_grid // merge, w_grid // merge
    cell = sample.masks.shape[1] // rows_m  # frame pixels per merged token side
    rows = []
    for t in range(t_grid):
        frames = frame_indices[t * processor.TEMPORAL_PATCH_SIZE:(t + 1) * processor.TEMPORAL_PATCH_SIZE]
        masks = sample.masks[frames]
        for h in range(rows_m):
            for w in range(cols_m):
                obj = _cell_object(sample, masks, h * cell, (h + 1) * cell, w * cell, (w + 1) * cell,
                                   _MIN_TOKEN_PIXELS)
                colour, direction = _colour_and_direction(sample, obj)
                shape = IGNORE
                if obj is not None:
                    body = obj.body
                    cy, cx = (body.start[i] + body.velocity[i] * frames[0] for i in (0, 1))
                    if int(cy // cell) == h and int(cx // cell) == w:
                        shape = 1 + video_task.SHAPES.index(body.shape)
                quadrant = 2 * (2 * h >= rows_m) + (2 * w >= cols_m)
                rows.append([colour, shape, direction, quadrant, int(obj is not None)])
    return torch.tensor(rows, dtype=torch.long)


def patch_targets(sample, frame_indices: list[int], grid_thw: list[int], merge: int = MERGE_SIZE) -> "torch.Tensor":
    """[t * h * w patches, len(PATCH_AUX_CLASSES)] labels, patches in the processor's order
    (merge groups of merge x merge patches, row by row), as the merger reads them."""
    import torch

    t_grid, h_grid, w_grid = grid_thw
    patch = processor.PATCH_SIZE
    rows = []
    for t in range(t_grid):
        masks = sample.masks[frame_indices[t * processor.TEMPORAL_PATCH_SIZE:(t + 1) * processor.TEMPORAL_PATCH_SIZE]]
        for hm in range(h_grid // merge):
            for wm in range(w_grid // merge):
                for mh in range(merge):
                    for mw in range(merge):
                        h, w = hm * merge + mh, wm * merge + mw
                        rows.append(_colour_and_direction(sample, _cell_object(
                            sample, masks, h * patch, (h + 1) * patch, w * patch, (w + 1) * patch,
                            _MIN_PATCH_PIXELS)))
    return torch.tensor(rows, dtype=torch.long)
