"""What differs between the vision-language model families hippo can draft for.

The scoring core (``hippo_vllm.core``) works on a ``VideoGrid`` of LLM tokens and
knows no model. Each family hippo supports is one ``ModelFamily`` here, holding
what the vLLM side must know about it:

- which Hugging Face architectures it covers;
- how its processor lays out a video: the ``mm_features`` key holding the video's
  patch grid (or frames), and how that becomes the grid of LLM tokens the scores
  run on (``video_grid``): the Qwen families' patch merger, LLaVA-OneVision's
  per-frame 2x2 pooling;
- how its prompt positions are assigned: M-RoPE (t, h, w) positions (Qwen3-VL's
  interleave the three sections across the rotary dims, inside vLLM's rotary
  embedding), or plain 1-D positions (LLaVA-OneVision); a kept video token
  carries its position with it into the draft (``prompt_positions`` takes them
  from what the target's runner computed);
- how many rows after a video's frame tokens hold a learned newline embedding
  (``video_newlines``; LLaVA-OneVision: one ``image_newline`` after the last
  frame): the draft always keeps them and never scores them;
- (no field: read from vLLM for every family) which rows of a video's placeholder
  are video: Qwen3-VL's also spans ``<t seconds><|vision_start|>`` and
  ``<|vision_end|>`` text around each temporal patch's pads, and ``is_embed`` marks
  the pads; the draft prunes among those and keeps the text;
- whether the vision tower feeds DeepStack features into the first decoder layers
  (Qwen3-VL): each video row's features travel with its row into the draft.

Draft and target must be of one family: the draft runs on the target's processor
outputs and positions.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from hippo_vllm.core import VideoGrid

MROPE = "mrope"  # 3-row (t, h, w) rotary positions, vLLM's ``uses_mrope``
ROPE_1D = "1d"  # one position per token (the draft's side carries it as three equal rows)


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    name: str
    architectures: tuple[str, ...]
    positions: str  # how prompt positions are assigned, e.g. MROPE
    video_grid_key: str  # the mm_features data key holding a video's (t, h, w) patch grid (or its frames)
    deepstack: bool = False  # vision features also added to early decoder layers' outputs
    video_newlines: int = 0  # trailing rows of each video's embeddings that are newlines, not frame tokens
    # vision_config entries that fix how the tower reads the processor's pixels: the
    # draft runs on the target's processor outputs, so its values must be the target's.
    vision_input_keys: tuple[str, ...] = ("patch_size", "temporal_patch_size", "spatial_merge_size")

    def covers(self, hf_config: Any) -> bool:
        return architecture_of(hf_config) in self.architectures

    def video_grid(self, feature: Any, hf_config: Any) -> VideoGrid:
        """The LLM token grid of one video mm feature processed by this family's processor."""
        thw = feature.data[self.video_grid_key].data
        merge = hf_config.vision_config.spatial_merge_size
        return VideoGrid.from_thw(tuple(int(x) for x in thw.flatten().tolist()), merge)

    def layout_problem(self, hf_config: Any) -> str | None:
        """Why this adapter cannot lay out a video of the checkpoint ``hf_config``, or None.

        The Qwen families read every video's layout from the processor's patch grid
        and the merge size, whatever their values.
        """
        return None

    def prompt_positions(
        self, prompt_len: int, mrope_positions: torch.Tensor | None, mrope_delta: int | None
    ) -> tuple[torch.Tensor, int]:
        """The positions the target gave a request's prompt rows, as the draft takes them.

        ``mrope_positions``/``mrope_delta``: what vLLM's runner computed for the
        request when it arrived (M-RoPE families; None otherwise). Returns a
        ``[3, P]`` int64 tensor (a copy holding only the prompt's rows) and the
        offset of the outputs: output token i sits at position ``P + i + offset``.
        """
        assign = _PROMPT_POSITIONS.get(self.positions)
        if assign is None:
            raise ValueError(f"{self.name}: positions {self.positions!r} have no prompt positions for the "
                             f"draft; allowed: {sorted(_PROMPT_POSITIONS)}")
        return assign(prompt_len, mrope_positions, mrope_delta)


def _mrope_prompt_positions(prompt_len: int, mrope_positions: Any, mrope_delta: Any) -> tuple[torch.Tensor, int]:
    """vLLM's runner computes a prompt's M-RoPE positions when the request arrives."""
    return mrope_positions[:, :prompt_len].to(torch.long).clone(), int(mrope_delta or 0)


def _rope_1d_prompt_positions(prompt_len: int, mrope_positions: Any, mrope_delta: Any) -> tuple[torch.Tensor, int]:
    """Position i at row i, as three equal rows like the draft's text rows."""
    return torch.arange(prompt_len).expand(3, -1).clone(), 0


# ModelFamily.positions -> how the draft reads a prompt's positions from the target's request state.
_PROMPT_POSITIONS = {MROPE: _mrope_prompt_positions, ROPE_1D: _rope_1d_prompt_positions}


QWEN2_5_VL = ModelFamily(
    name="Qwen2.5-VL",
    architectures=("Qwen2_5_VLForConditionalGeneration",),
    positions=MROPE,
    video_grid_key="video_grid_thw",
)
QWEN2_VL = ModelFamily(
    name="Qwen2-VL",
    architectures=("Qwen2VLForConditionalGeneration",),
    positions=MROPE,
    video_grid_key="video_grid_thw",
)
# Dense and MoE Qwen3-VL checkpoints share the processor, the interleaved M-RoPE and the
# DeepStack injection (vLLM's MoE class subclasses the dense one); only the decoder's MLPs
# differ, so either can draft for the other.
QWEN3_VL = ModelFamily(
    name="Qwen3-VL",
    architectures=("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration"),
    positions=MROPE,
    video_grid_key="video_grid_thw",
    deepstack=True,
)


@dataclasses.dataclass(frozen=True)
class PooledFramesFamily(ModelFamily):
    """A family whose tower encodes each frame alone and pools its patch features (LLaVA-OneVision).

    vLLM's ``LlavaOnevisionForConditionalGeneration`` runs every frame (resized to the
    tower's ``image_size``) through the vision tower and projector, pools the
    ``image_size / patch_size`` square of features bilinearly to ``ceil(side / stride)``
    per side, flattens the frames in order (frame, row, column) and appends one
    ``image_newline`` embedding after the last frame; the prompt holds one video
    token per row of that. The grid is therefore (frames, pooled side, pooled side),
    with ``video_newlines`` rows after it.
    """

    # How vLLM pools a video's frame features (llava_onevision.py: ``apply_pooling``
    # with its default stride of 2, bilinear, whatever the checkpoint says).
    POOLING = {"spatial_pool_stride": 2, "spatial_pool_mode": "bilinear"}

    def layout_problem(self, hf_config: Any) -> str | None:
        for key, known in self.POOLING.items():
            value = getattr(hf_config, key, None)
            if value is not None and value != known:
                return f"its {key} is {value!r}, where vLLM pools video frames with {key} {known!r}"
        return None

    def video_grid(self, feature: Any, hf_config: Any) -> VideoGrid:
        frames = int(feature.data[self.video_grid_key].data.shape[0])  # [frames, 3, H, W]
        vision = hf_config.vision_config
        # The stride vLLM's processor counts the video tokens with (its pooling uses 2 too).
        stride = int(getattr(hf_config, "spatial_pool_stride", 2))
        side = math.ceil((vision.image_size // vision.patch_size) / stride)
        return VideoGrid(frames, side, side)


LLAVA_ONEVISION = PooledFramesFamily(
    name="LLaVA-OneVision",
    architectures=("LlavaOnevisionForConditionalGeneration",),
    positions=ROPE_1D,
    video_grid_key="pixel_values_videos",
    video_newlines=1,
    vision_input_keys=("image_size", "patch_size"),
)
FAMILIES = (QWEN2_5_VL, QWEN2_VL, QWEN3_VL, LLAVA_ONEVISION)


def architecture_of(hf_config: Any) -> str:
    archs = getattr(hf_config, "architectures", None) or ["<none>"]
    return archs[0]


def supported_architectures() -> list[str]:
    return [arch for family in FAMILIES for arch in family.architectures]


def family_of(hf_config: Any) -> ModelFamily | None:
    """The family of a vision-language checkpoint's config, or None when hippo has none for it."""
    if getattr(hf_config, "vision_config", None) is None:
        return None
    return next((family for family in FAMILIES if family.covers(hf_config)), None)
