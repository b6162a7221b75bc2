"""Training the trained pair: the vision tower on auxiliary labels, then the language model.

`trained_pair.write_trained_pair` runs these stages with the recipe's settings
(`TrainSpec`): stage 1 (`train_vision`) teaches each vision tower to see colour,
shape, motion and position from dense per-token and per-patch labels; stage 2
(`train_language`) trains the target's language model on the template answers and
distils the draft's from the target's answer-token distributions, both on video
embeddings cached once per pool video.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hippo_testbed import models, video_task
from hippo_testbed.models import TextSpec, VisionSpec
from hippo_testbed.trained_pair import TrainSpec
from hippo_testbed.trained_pair_inputs import PATCH_AUX_CLASSES, TOKEN_AUX_CLASSES, VideoInputs, video_inputs

if TYPE_CHECKING:  # torch is imported where it is used: importing this module stays cheap
    import torch


def training_samples(seed_start: int, count: int):
    """TRAIN_SEEDS[seed_start:seed_start + count]; each seed's kind is `default_kind(seed)`."""
    seeds = video_task.TRAIN_SEEDS[seed_start:seed_start + count]
    if len(seeds) != count:
        raise ValueError(f"{count} training videos from {seed_start} exceed TRAIN_SEEDS {video_task.TRAIN_SEEDS}")
    return [video_task.make_sample(seed) for seed in seeds]


@dataclass
class Batch:
    """Every question of a few videos. The shared prefix (system turn and video, up to
    <|vision_end|>) is one row per video; the suffixes (question, answer) one row per
    question, right-padded, with the answer positions marked."""

    prefix_ids: "torch.Tensor"       # [videos, P]
    prefix_positions: "torch.Tensor"  # [3, videos, P] M-RoPE positions
    suffix_ids: "torch.Tensor"       # [N, S]
    suffix_mask: "torch.Tensor"      # [N, S]
    suffix_positions: "torch.Tensor"  # [3, N, S]
    labels: "torch.Tensor"           # [N, S], -100 outside answers (next-token targets)
    questions_per_video: int
    pixel_values: "torch.Tensor | None"  # patches of every video, once (None: videos without pixels)
    grid_thw: "torch.Tensor"         # [videos, 3]


def make_batch(model, videos: list[VideoInputs], pad_id: int, video_id: int, end_id: int) -> Batch:
    """`end_id` (<|vision_end|>) closes the prefix all questions of a video share."""
    import torch

    per_video = {len(v.prompts) for v in videos}
    if len(per_video) != 1:
        raise ValueError(f"videos must have the same number of questions, got {sorted(per_video)}")
    prefix_len = videos[0].prompts[0].index(end_id) + 1
    rows, answer_spans = [], []
    for v in videos:
        for prompt, answer in zip(v.prompts, v.answers):
            if prompt[:prefix_len] != videos[0].prompts[0][:prefix_len]:
                raise ValueError("questions do not share the system-and-video prefix")
            rows.append(prompt + answer)
            answer_spans.append((len(prompt), len(prompt) + len(answer)))
    length = max(map(len, rows))
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    for i, (row, (start, stop)) in enumerate(zip(rows, answer_spans)):
        input_ids[i, :len(row)] = torch.tensor(row)
        attention_mask[i, :len(row)] = 1
        # labels[i, p] is the token at p + 1: the answer tokens, predicted from the one before.
        labels[i, start - 1:stop - 1] = torch.tensor(row[start:stop])
    questions = per_video.pop()
    grid = torch.cat([v.grid_thw for v in videos])
    position_ids, _ = model.model.get_rope_index(
        input_ids, (input_ids == video_id).int() * 2, video_grid_thw=grid.repeat_interleave(questions, 0),
        second_per_grid_ts=torch.tensor([v.second_per_grid for v in videos]).repeat_interleave(questions),
        attention_mask=attention_mask)
    firsts = torch.arange(0, len(rows), questions)
    return Batch(
        prefix_ids=input_ids[firsts, :prefix_len], prefix_positions=position_ids[:, firsts, :prefix_len],
        suffix_ids=input_ids[:, prefix_len:], suffix_mask=attention_mask[:, prefix_len:],
        suffix_positions=position_ids[:, :, prefix_len:], labels=labels[:, prefix_len:],
        questions_per_video=questions, grid_thw=grid,
        pixel_values=None if any(v.pixel_values is None for v in videos)
        else torch.cat([v.pixel_values for v in videos]))


def forward(model, batch: Batch, video_embeds=None) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(suffix logits [N, S, V], video token embeddings [all tokens, hidden]).

    `video_embeds` given (the vision tower's output for the batch's videos, e.g.
    cached), the tower does not run.

    Each video is encoded once, and its prefix runs once: the prefix's KV cache is
    reused by each of the video's questions (gradients flow through it), which is the
    same computation as running every full sequence, at a fraction of the cost. The
    suffixes run one question at a time, cut to that question's longest row: the
    description's answer is several times longer than a template answer, and
    padding every row to it would multiply the suffix work.
    """
    import torch
    import torch.nn.functional as F
    from transformers import DynamicCache

    lm = model.model.language_model
    if video_embeds is None:
        features = model.model.get_video_features(batch.pixel_values, batch.grid_thw, return_dict=True)
        video_embeds = torch.cat(features.pooler_output)
    embeds = lm.embed_tokens(batch.prefix_ids)
    video_mask = (batch.prefix_ids == model.config.video_token_id).unsqueeze(-1).expand_as(embeds)
    embeds = embeds.masked_scatter(video_mask, video_embeds.to(embeds.dtype))
    prefix = lm(inputs_embeds=embeds, position_ids=batch.prefix_positions, use_cache=True)
    prefix_kv = [(layer.keys, layer.values) for layer in prefix.past_key_values.layers]
    questions, (rows, suffix_len) = batch.questions_per_video, batch.suffix_ids.shape
    prefix_len = batch.prefix_ids.shape[1]
    per_question = []
    for q in range(questions):
        picked = torch.arange(q, rows, questions)   # rows are video-major: video * questions + q
        length = int(batch.suffix_mask[picked].sum(1).max())
        mask = torch.cat([torch.ones((len(picked), prefix_len), dtype=batch.suffix_mask.dtype),
                          batch.suffix_mask[picked, :length]], 1)
        out = lm(inputs_embeds=lm.embed_tokens(batch.suffix_ids[picked, :length]), attention_mask=mask,
                 position_ids=batch.suffix_positions[:, picked, :length],
                 past_key_values=DynamicCache(prefix_kv), use_cache=True)
        per_question.append(F.pad(model.lm_head(out.last_hidden_state), (0, 0, 0, suffix_len - length)))
    logits = torch.stack(per_question, 1)             # [videos, questions, S, V]
    return logits.reshape(rows, suffix_len, -1), video_embeds


def new_model(text: TextSpec, vision: VisionSpec, tok, seed: int):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = models.qwen25_vl_config(text, vision, tok)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen2_5_VLForConditionalGeneration(config).to(torch.float32)


def _schedule(warmup_steps: int, steps: int):
    import math

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, steps - warmup_steps)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def _special_ids(tok) -> tuple[int, int, int]:
    return tuple(tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|video_pad|>", "<|vision_end|>"))


def _update(optimizer, scheduler, params, loss) -> None:
    """One optimiser step on ``loss``, gradients clipped to norm 1."""
    import torch

    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    scheduler.step()


def train_vision(model, spec: TrainSpec, proc, log=None) -> None:
    """Stage 1: the vision tower alone, on the per-token and per-patch auxiliary labels
    (TOKEN_AUX_CLASSES, PATCH_AUX_CLASSES) of fresh training videos every step."""
    import torch
    import torch.nn.functional as F

    visual = model.model.visual
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        token_heads = torch.nn.ModuleList(torch.nn.Linear(model.config.text_config.hidden_size, n)
                                          for n in TOKEN_AUX_CLASSES.values())
        patch_heads = torch.nn.ModuleList(torch.nn.Linear(visual.config.hidden_size, n)
                                          for n in PATCH_AUX_CLASSES.values())
    captured = {}
    hook = visual.merger.register_forward_hook(lambda module, args, out: captured.update(patches=args[0]))
    params = [*visual.parameters(), *token_heads.parameters(), *patch_heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=spec.vision_lr, weight_decay=spec.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(spec.warmup_steps, spec.vision_steps))
    model.train()
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="hippo_trained_pair_") as tmp:
            for step in range(spec.vision_steps):
                first = spec.first_video_seed + step * spec.videos_per_vision_step
                videos = [video_inputs(proc, s, Path(tmp))
                          for s in training_samples(first, spec.videos_per_vision_step)]
                features = model.model.get_video_features(torch.cat([v.pixel_values for v in videos]),
                                                          torch.cat([v.grid_thw for v in videos]), return_dict=True)
                tokens = torch.cat(features.pooler_output)
                token_labels = torch.cat([v.token_targets for v in videos])
                patch_labels = torch.cat([v.patch_targets for v in videos])
                loss = (sum(F.cross_entropy(h(tokens), token_labels[:, i]) for i, h in enumerate(token_heads))
                        / len(token_heads)
                        + sum(F.cross_entropy(h(captured["patches"]), patch_labels[:, i])
                              for i, h in enumerate(patch_heads)) / len(patch_heads))
                _update(optimizer, scheduler, params, loss)
                if log is not None and (step % 50 == 0 or step == spec.vision_steps - 1):
                    log(f"{time.monotonic() - started:.0f}s vision step {step}/{spec.vision_steps} "
                        f"aux loss {loss.item():.4f}")
    finally:
        hook.remove()
    model.eval()


def cached_videos(models_: list, proc, seeds, workdir: Path) -> list[tuple[VideoInputs, list]]:
    """Per seed: its inputs (pixels dropped) and each model's video embeddings, computed once."""
    import torch

    out = []
    for i in range(0, len(seeds), 16):
        videos = [video_inputs(proc, video_task.make_sample(s), workdir) for s in seeds[i:i + 16]]
        pixels, grid = torch.cat([v.pixel_values for v in videos]), torch.cat([v.grid_thw for v in videos])
        with torch.no_grad():
            embeds = [m.model.get_video_features(pixels, grid, return_dict=True).pooler_output for m in models_]
        for j, v in enumerate(videos):
            v.pixel_values = None
            out.append((v, [e[j] for e in embeds]))
    return out


def train_language(model, spec: TrainSpec, proc, teacher=None, log=None) -> None:
    """Stage 2: the language model (vision tower frozen) on the video embeddings of a
    fixed pool of training videos, cached once: cross-entropy on the template answers,
    or, with a `teacher`, KL divergence to its answer-token distributions."""
    import torch
    import torch.nn.functional as F

    pad_id, video_id, end_id = _special_ids(proc.tokenizer)
    first = spec.first_video_seed + spec.vision_steps * spec.videos_per_vision_step
    seeds = video_task.TRAIN_SEEDS[first:first + spec.pool_videos]
    if len(seeds) != spec.pool_videos:
        raise ValueError(f"{spec.pool_videos} pool videos from {first} exceed TRAIN_SEEDS {video_task.TRAIN_SEEDS}")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="hippo_trained_pair_") as tmp:
        pool = cached_videos([model] + ([teacher] if teacher is not None else []), proc, seeds, Path(tmp))
    if log is not None:
        log(f"{time.monotonic() - started:.0f}s cached {len(pool)} videos")
    model.model.visual.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.language_lr, weight_decay=spec.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(spec.warmup_steps, spec.language_steps))
    generator = torch.Generator().manual_seed(spec.seed)
    model.train()
    for step in range(spec.language_steps):
        picked = [pool[i] for i in torch.randint(len(pool), (spec.videos_per_language_step,),
                                                 generator=generator).tolist()]
        batch = make_batch(model, [v for v, _ in picked], pad_id, video_id, end_id)
        where = batch.labels != -100
        logits = forward(model, batch, torch.cat([e[0] for _, e in picked]))[0][where]
        if teacher is None:
            loss = F.cross_entropy(logits, batch.labels[where])
        else:
            with torch.no_grad():
                target_logp = F.log_softmax(forward(teacher, batch, torch.cat([e[1] for _, e in picked]))[0][where], -1)
            loss = F.kl_div(F.log_softmax(logits, -1), target_logp, log_target=True, reduction="batchmean")
        _update(optimizer, scheduler, params, loss)
        if log is not None and (step % 100 == 0 or step == spec.language_steps - 1):
            log(f"{time.monotonic() - started:.0f}s language step {step}/{spec.language_steps} loss {loss.item():.4f}")
    model.model.visual.requires_grad_(True)
    model.eval()
