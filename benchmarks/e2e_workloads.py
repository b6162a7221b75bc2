"""``bench_e2e``'s prompts and checkpoints: the batches every row generates.

``--models tiny`` (and the families) ask open questions about the fixtures' clips
(`build_requests`); ``--models trained`` asks the synthetic task's held-out questions
(`task_workloads`), with the trained pair and a text-only copy of its draft for vLLM's
``draft_model`` (`trained_models`).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

QUESTIONS = ("Describe this video.", "What moves in the video?", "Which colours appear?",
             "Tell me everything about the objects and their motion.")
# --models trained: the longest answers plus <|im_end|> (the trained pair's tokenizer).
DESCRIBE_MAX_TOKENS, TEMPLATE_MAX_TOKENS = 44, 12


@dataclasses.dataclass(frozen=True)
class TrainedModels:
    """The trained pair in the fixtures' shape: target, draft (the ``tiny`` pair) and text_draft."""

    target: pathlib.Path
    draft: pathlib.Path
    text_draft: pathlib.Path

    def as_dict(self) -> dict:
        return {key: str(value) for key, value in dataclasses.asdict(self).items()}


def trained_models(scratch: pathlib.Path, merge_size: int) -> TrainedModels:
    from hippo_testbed.trained_pair import trained_pair_paths

    target, draft = trained_pair_paths(merge_size=merge_size)
    return TrainedModels(target, draft, text_only_checkpoint(draft, scratch / "text_draft"))


def text_only_checkpoint(vl_dir: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    """A Qwen2ForCausalLM checkpoint of a Qwen2.5-VL checkpoint's language model (vision dropped).

    On text the two compute the same logits: M-RoPE with equal (t, h, w) positions is
    plain RoPE. Weights keep their names (``model.*``, ``lm_head``); tokenizer files are copied.
    """
    import shutil

    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((vl_dir / "config.json").read_text())
    text = dict(config["text_config"])
    rope = {key: value for key, value in text.get("rope_parameters", {}).items() if key != "mrope_section"}
    text.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", rope_parameters=rope,
                tie_word_embeddings=config.get("tie_word_embeddings", False))
    (out / "config.json").write_text(json.dumps(text, indent=2))
    weights = load_file(str(vl_dir / "model.safetensors"))
    save_file({name: w for name, w in weights.items() if not name.startswith("visual.")},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (vl_dir / name).exists():
            shutil.copy(vl_dir / name, out / name)
    return out


@dataclasses.dataclass(frozen=True)
class Workload:
    """One batch of prompts every row generates, with its sampling limits."""

    name: str
    requests: list
    max_tokens: int
    ignore_eos: bool = True
    # --fresh-videos: batch r (0: the warm-up) asks about videos of its own; else every
    # batch repeats ``requests``, and the timed ones reuse the warm-up's encoder outputs.
    fresh_batches: tuple = ()

    def batch(self, repeat: int) -> list:
        return self.fresh_batches[repeat] if self.fresh_batches else self.requests


def task_requests(tokenizer, num_prompts: int, num_frames: int, scratch: pathlib.Path,
                  questions: str = "template", first_sample: int = 0) -> list[dict]:
    """Held-out questions of the synthetic video task, from held-out sample ``first_sample``
    on: ``describe``, each video's description; ``template``, each sample's two focus questions."""
    from hippo_testbed import load_video, video_chat_prompt
    from hippo_testbed.video_task import HELD_OUT_SEEDS, make_sample

    requests, seed = [], HELD_OUT_SEEDS[first_sample]
    while len(requests) < num_prompts:
        sample = make_sample(seed)
        video = load_video(sample.write_mp4(scratch / f"task_{seed}.mp4"), num_frames)
        asked = [qa for qa in sample.qa if qa.topic == "describe"] if questions == "describe" else sample.qa[:2]
        requests += [{"prompt": video_chat_prompt(tokenizer, qa.question), "multi_modal_data": {"video": video}}
                     for qa in asked]
        seed += 1
    return requests[:num_prompts]


def task_workloads(tokenizer, args, scratch: pathlib.Path) -> list[Workload]:
    """Per question kind and batch size, held-out task prompts (answers end at <|im_end|>)."""
    limits = {"describe": DESCRIBE_MAX_TOKENS, "template": TEMPLATE_MAX_TOKENS}
    workloads, next_sample = [], 0
    for questions in args.questions:
        for batch in args.batch_sizes:
            batches = 1 + args.repeats if args.fresh_videos else 1
            # With --fresh-videos every batch of the run, in every workload, has samples of its own.
            made = [task_requests(tokenizer, batch, args.num_frames, scratch, questions,
                                  first_sample=next_sample + i * batch) for i in range(batches)]
            next_sample += batches * batch if args.fresh_videos else 0
            workloads.append(Workload(f"{questions} b{batch}", made[0], min(limits[questions], args.max_tokens),
                                      ignore_eos=False, fresh_batches=tuple(made) if args.fresh_videos else ()))
    return workloads


def build_requests(fx, tokenizer, num_prompts: int, num_frames: int) -> list[dict]:
    """Synthetic clips alternating with real sample videos (when installed)."""
    from hippo_testbed import load_video, video_chat_prompt

    synthetic, samples = list(fx.synthetic_videos), list(fx.sample_videos)
    videos = [v for pair in zip(synthetic, samples) for v in pair] or synthetic
    videos += [v for v in synthetic + samples if v not in videos]
    return [
        {"prompt": video_chat_prompt(tokenizer, QUESTIONS[i % len(QUESTIONS)]),
         "multi_modal_data": {"video": load_video(videos[i % len(videos)], num_frames)}}
        for i in range(num_prompts)
    ]
