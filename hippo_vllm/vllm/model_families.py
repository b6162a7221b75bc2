"""What differs between the vision-language model families hippo can draft for.

The scoring core (``hippo_vllm.core``) works on a ``VideoGrid`` of LLM tokens and
knows no model. Each family hippo supports is one ``ModelFamily`` here, holding
what the vLLM side must know about it:

- which Hugging Face architectures it covers;
- how its processor lays out a video: the ``mm_features`` key holding the video's
  patch grid, and the patch merger that turns that grid into LLM tokens
  (``video_grid``);
- how its prompt positions are assigned: M-RoPE (t, h, w) positions (Qwen3-VL's
  interleave the three sections across the rotary dims, inside vLLM's rotary
  embedding), which a kept video token carries with it into the draft;
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
from typing import Any

from hippo_vllm.core import VideoGrid

MROPE = "mrope"  # 3-row (t, h, w) rotary positions, vLLM's ``uses_mrope``


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    name: str
    architectures: tuple[str, ...]
    positions: str  # how prompt positions are assigned, e.g. MROPE
    video_grid_key: str  # the mm_features data key holding a video's (t, h, w) patch grid
    deepstack: bool = False  # vision features also added to early decoder layers' outputs

    def covers(self, hf_config: Any) -> bool:
        return architecture_of(hf_config) in self.architectures

    def video_grid(self, feature: Any, hf_config: Any) -> VideoGrid:
        """The LLM token grid of one video mm feature processed by this family's processor."""
        thw = feature.data[self.video_grid_key].data
        merge = hf_config.vision_config.spatial_merge_size
        return VideoGrid.from_thw(tuple(int(x) for x in thw.flatten().tolist()), merge)


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
FAMILIES = (QWEN2_5_VL, QWEN2_VL, QWEN3_VL)


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
