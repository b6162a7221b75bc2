"""s_attn: how much the text that follows a video attends to each video token.

For each layer and query head the text queries ``Q_txt`` are
scored against the cached, post-RoPE video keys ``K_vid``; the softmax runs over
the video keys only (every text query is renormalised over the video), and the
probabilities are averaged over query rows, heads and layers.

FlashAttention-style kernels never materialise attention probabilities, so the
small text→video block is recomputed here from the text queries and the video
keys ("KV-based reconstruction"). The block is computed in float32 slices of
(head, query) rows that share one KV head, so peak extra memory stays bounded
(about :data:`DEFAULT_BLOCK_BYTES`) however long the video is.

Exact definition used by :class:`AttentionScoreAccumulator`::

    layer_mean_l[j] = Σ_{rows i, heads h delivered for layer l} P_l[h, i, j]
                      / (number of (row, head) pairs delivered for layer l)
    s_attn[j]       = mean over layers l of layer_mean_l[j]

A layer may arrive in several query chunks (chunked prefill delivers the text in
pieces); counting rows per layer makes the result identical to adding the whole
layer at once, and every layer weighs the same however many chunks it came in.
For the same reason accumulators that saw disjoint sets of query heads (tensor
parallelism shards heads over ranks) combine exactly: add their
:meth:`~AttentionScoreAccumulator.layer_totals` and load the sums with
:meth:`~AttentionScoreAccumulator.set_layer_totals`.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from hippo_vllm.core.validation import check_positive_int, check_real, check_tensor

DEFAULT_BLOCK_BYTES = 64 * 2**20
"""Budget for one float32 logits block (rows × video tokens) when no head_block is given."""


@dataclass
class _LayerTotal:
    """Softmax probabilities of one layer summed over its (query row, head) pairs so far."""

    prob_sum: torch.Tensor  # float64 [N_v]
    pair_count: int = 0


class AttentionScoreAccumulator:
    """Running s_attn over layers (and query chunks) for one video.

    Usage::

        acc = AttentionScoreAccumulator(num_video_tokens=grid.num_tokens)
        for layer, (q, k) in enumerate(per_layer_text_queries_and_video_keys):
            acc.add_layer(q, k, layer=layer)
        s_attn = acc.scores()          # float32 [N_v]

    Memory: one float64 ``[N_v]`` sum per distinct layer, plus one logits
    block during :meth:`add_layer`.
    """

    def __init__(self, num_video_tokens: int) -> None:
        self._num_video_tokens = check_positive_int("num_video_tokens", num_video_tokens)
        self._layer_totals: dict[Hashable, _LayerTotal] = {}
        self._next_auto_layer = 0

    @property
    def num_video_tokens(self) -> int:
        """Number of video keys every added layer must have."""
        return self._num_video_tokens

    @property
    def num_layers(self) -> int:
        """Number of distinct layers added so far."""
        return len(self._layer_totals)

    @property
    def device(self) -> torch.device:
        """Where the sums live (the device of the added keys; CPU before any layer)."""
        for total in self._layer_totals.values():
            return total.prob_sum.device
        return torch.device("cpu")

    def layer_totals(self, layers: Sequence[Hashable]) -> tuple[torch.Tensor, torch.Tensor]:
        """The running sums of ``layers``, in that order: float64 ``[len(layers), N_v]``
        probability sums and float64 ``[len(layers)]`` (query row, head) pair counts.

        A layer not added yet has zero sums and a zero count.
        """
        sums = torch.zeros(len(layers), self._num_video_tokens, dtype=torch.float64, device=self.device)
        counts = torch.zeros(len(layers), dtype=torch.float64)
        for i, layer in enumerate(layers):
            total = self._layer_totals.get(layer)
            if total is not None:
                sums[i] = total.prob_sum
                counts[i] = total.pair_count
        return sums, counts

    def set_layer_totals(self, layers: Sequence[Hashable], prob_sums: torch.Tensor, pair_counts: torch.Tensor) -> None:
        """Replace every running sum by the given ones (the layout of :meth:`layer_totals`).

        Layers with a zero pair count count as not added.
        """
        prob_sums = check_tensor("prob_sums", prob_sums)
        pair_counts = check_tensor("pair_counts", pair_counts)
        if tuple(prob_sums.shape) != (len(layers), self._num_video_tokens):
            raise ValueError(
                f"prob_sums must be [{len(layers)}, {self._num_video_tokens}] (layers, video tokens), "
                f"got {list(prob_sums.shape)}"
            )
        if tuple(pair_counts.shape) != (len(layers),):
            raise ValueError(f"pair_counts must be [{len(layers)}] (one per layer), got {list(pair_counts.shape)}")
        if bool((pair_counts < 0).any()) or bool((pair_counts != pair_counts.round()).any()):
            raise ValueError(f"pair_counts must be whole numbers >= 0, got {pair_counts.tolist()}")
        self._layer_totals = {
            layer: _LayerTotal(prob_sums[i].to(torch.float64).clone(), int(pair_counts[i]))
            for i, layer in enumerate(layers)
            if pair_counts[i] > 0
        }

    def add_layer(
        self,
        q_text: torch.Tensor,
        k_video: torch.Tensor,
        scale: float | None = None,
        head_block: int | None = None,
        layer: Hashable | None = None,
    ) -> None:
        """Add one layer's (or one query chunk of a layer's) text→video attention.

        Args:
            q_text: ``[L_txt, H_q, d]`` post-RoPE queries of the text after the
                video (any floating dtype; computed in float32).
            k_video: ``[N_v, H_kv, d]`` post-RoPE keys of the video tokens. GQA:
                ``H_q`` must be a multiple of ``H_kv``; query head ``i`` reads
                KV head ``i // (H_q // H_kv)``.
            scale: logit scale; default ``1 / sqrt(d)``.
            head_block: query heads per computed block (blocks never straddle
                two KV heads, so it is effectively capped at ``H_q // H_kv``).
                Default: as many (head, query) rows as fit a float32 block of
                :data:`DEFAULT_BLOCK_BYTES`, splitting a head's rows if needed.
            layer: key of the layer this call belongs to. Calls with the same key
                are query chunks of one layer and are pooled before the
                per-layer mean. ``None`` starts a new layer with an automatic key.
        """
        q_text, k_video, scale = self._check_inputs(q_text, k_video, scale)
        num_rows, num_q_heads, head_dim = q_text.shape
        num_kv_heads = k_video.shape[1]
        group = num_q_heads // num_kv_heads
        if head_block is None:
            rows_per_block = max(1, DEFAULT_BLOCK_BYTES // (4 * self._num_video_tokens))
        else:
            rows_per_block = check_positive_int("head_block", head_block) * num_rows

        layer_sum = torch.zeros(self._num_video_tokens, dtype=torch.float64, device=q_text.device)
        # [H_kv, G·L, d]: the rows of the G query heads that share KV head g, head-major.
        q_grouped = q_text.permute(1, 0, 2).reshape(num_kv_heads, group * num_rows, head_dim)
        for kv_head in range(num_kv_heads):
            keys_t = k_video[:, kv_head, :].to(torch.float32).t()  # [d, N_v]
            group_rows = q_grouped[kv_head]
            for start in range(0, group_rows.shape[0], rows_per_block):
                block = group_rows[start : start + rows_per_block].to(torch.float32)
                layer_sum += _softmax_column_sums(torch.matmul(block, keys_t).mul_(scale))

        if layer is None:
            # Skip keys a caller may have used explicitly so auto layers never merge into them.
            while self._next_auto_layer in self._layer_totals:
                self._next_auto_layer += 1
            layer = self._next_auto_layer
        total = self._layer_totals.setdefault(layer, _LayerTotal(torch.zeros_like(layer_sum)))
        total.prob_sum += layer_sum
        total.pair_count += num_rows * num_q_heads

    def add_layer_sums(self, prob_sums: torch.Tensor, pair_count: int, layer: Hashable) -> None:
        """Add probabilities already summed over ``pair_count`` (query row, head) pairs of
        ``layer`` (what :meth:`add_layer` sums itself; a fused kernel computes them elsewhere)."""
        prob_sums = check_tensor("prob_sums", prob_sums)
        if tuple(prob_sums.shape) != (self._num_video_tokens,):
            raise ValueError(f"prob_sums must be [{self._num_video_tokens}] (video tokens), "
                             f"got {list(prob_sums.shape)}")
        pair_count = check_positive_int("pair_count", pair_count)
        total = self._layer_totals.get(layer)
        if total is None:  # the layer's first sums start its total (no zeros to add them to)
            self._layer_totals[layer] = _LayerTotal(prob_sums.to(torch.float64, copy=True), pair_count)
            return
        total.prob_sum += prob_sums.to(torch.float64)
        total.pair_count += pair_count

    def scores(self) -> torch.Tensor:
        """s_attn as float32 ``[N_v]``: per-layer mean over (row, head) pairs, then mean over layers.

        Each entry lies in [0, 1] and the vector sums to 1 (every text query's
        softmax over the video sums to 1). Raises ``RuntimeError`` if no layer
        was added.
        """
        if not self._layer_totals:
            raise RuntimeError("AttentionScoreAccumulator.scores() called before any add_layer()")
        totals = self._layer_totals.values()
        sums = torch.stack([total.prob_sum for total in totals])  # [layers, N_v]
        counts = torch.tensor([float(total.pair_count) for total in totals], dtype=sums.dtype, device=sums.device)
        return (sums / counts.unsqueeze(1)).mean(dim=0).to(torch.float32)  # one op per step, not per layer

    def _check_inputs(
        self, q_text: object, k_video: object, scale: float | None
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        q_text = check_tensor("q_text", q_text)
        k_video = check_tensor("k_video", k_video)
        if q_text.dim() != 3 or not q_text.is_floating_point():
            raise ValueError(
                f"q_text must be a floating tensor [L_txt, H_q, d], got shape {list(q_text.shape)} "
                f"dtype {q_text.dtype}"
            )
        if k_video.dim() != 3 or not k_video.is_floating_point():
            raise ValueError(
                f"k_video must be a floating tensor [N_v, H_kv, d], got shape {list(k_video.shape)} "
                f"dtype {k_video.dtype}"
            )
        num_rows, num_q_heads, head_dim = q_text.shape
        num_keys, num_kv_heads, key_dim = k_video.shape
        if num_rows < 1 or num_q_heads < 1 or head_dim < 1:
            raise ValueError(
                f"q_text must have at least one query row, head and channel, got {list(q_text.shape)}"
            )
        if num_kv_heads < 1:
            raise ValueError(f"k_video must have at least one KV head, got {list(k_video.shape)}")
        if key_dim != head_dim:
            raise ValueError(
                f"head_dim mismatch: q_text has d={head_dim} (shape {list(q_text.shape)}) but k_video has "
                f"d={key_dim} (shape {list(k_video.shape)})"
            )
        if num_q_heads % num_kv_heads:
            raise ValueError(
                f"q_text heads H_q={num_q_heads} must be a multiple of k_video heads "
                f"H_kv={num_kv_heads} (GQA)"
            )
        if q_text.device != k_video.device:
            raise ValueError(
                f"q_text is on {q_text.device} but k_video is on {k_video.device}; use one device"
            )
        if num_keys != self._num_video_tokens:
            raise ValueError(
                f"k_video must have N_v={self._num_video_tokens} video keys, got shape {list(k_video.shape)}"
            )
        if scale is None:
            scale = 1.0 / math.sqrt(head_dim)
        else:
            scale = check_real("scale", scale)
            if scale <= 0:
                raise ValueError(f"scale must be > 0, got {scale!r}")
        return q_text, k_video, scale


def attention_scores(
    q_text: torch.Tensor | Sequence[torch.Tensor],
    k_video: torch.Tensor | Sequence[torch.Tensor],
    scale: float | None = None,
) -> torch.Tensor:
    """s_attn for one video from per-layer text queries and video keys.

    Args:
        q_text: one layer ``[L_txt, H_q, d]``, a stacked ``[layers, L_txt, H_q, d]``
            tensor, or a sequence of per-layer 3-D tensors.
        k_video: the matching ``[N_v, H_kv, d]``, ``[layers, N_v, H_kv, d]`` or
            sequence, with the same number of layers as ``q_text``.
        scale: logit scale; default ``1 / sqrt(d)``.

    Returns:
        float32 ``[N_v]``, the mean over layers, heads and text queries of the
        softmax over video keys.
    """
    q_layers = _as_layer_list("q_text", q_text)
    k_layers = _as_layer_list("k_video", k_video)
    if len(q_layers) != len(k_layers):
        raise ValueError(
            "q_text and k_video must cover the same number of layers, "
            f"got {len(q_layers)} and {len(k_layers)}"
        )
    accumulator = AttentionScoreAccumulator(num_video_tokens=_num_keys(k_layers[0]))
    for q_layer, k_layer in zip(q_layers, k_layers, strict=True):
        accumulator.add_layer(q_layer, k_layer, scale=scale)
    return accumulator.scores()


def _softmax_column_sums(logits: torch.Tensor) -> torch.Tensor:
    """Σ_rows softmax(logits, dim=-1) as float64 ``[N_v]``, overwriting ``logits``.

    The row normalisation is folded into one matrix-vector product
    (Σ_i exp_ij / Z_i = (1/Z)ᵀ·exp), so no second rows × N_v buffer is needed.
    """
    logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
    inverse_row_sums = logits.sum(dim=-1).reciprocal_()
    return torch.mv(logits.t(), inverse_row_sums).to(torch.float64)


def _as_layer_list(name: str, value: object) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        if value.dim() == 3:
            return [value]
        if value.dim() == 4:
            if value.shape[0] < 1:
                raise ValueError(f"{name} must contain at least one layer, got shape {list(value.shape)}")
            return list(value.unbind(0))
        raise ValueError(
            f"{name} must be 3-D (one layer) or 4-D ([layers, ...]), got shape {list(value.shape)}"
        )
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if len(value) == 0:
            raise ValueError(f"{name} must contain at least one layer, got an empty sequence")
        return [check_tensor(f"{name}[{index}]", layer) for index, layer in enumerate(value)]
    raise ValueError(
        f"{name} must be a tensor or a sequence of per-layer tensors, got {type(value).__name__}"
    )


def _num_keys(k_layer: torch.Tensor) -> int:
    if k_layer.dim() != 3 or k_layer.shape[0] < 1:
        raise ValueError(
            f"k_video layers must have shape [N_v, H_kv, d] with N_v >= 1, got {list(k_layer.shape)}"
        )
    return int(k_layer.shape[0])
