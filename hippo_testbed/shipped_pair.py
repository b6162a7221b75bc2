"""The trained pair's weights, shipped with the repository, so nothing trains on first use.

`SHIPPED_DIR / <key>` holds the trained target's and draft's checkpoint folders as
training writes them (weights, config, tokenizer, processor), except that the
target's zero-output cost-padding layers are left out: they are copies of the last
trained layer with `o_proj` and `down_proj` zeroed, so `materialize` rebuilds them
at load (`cost_padding.cost_padded`) and the folder stays a few MB.

`<key>` hashes the recipe without the library versions: the weights are numbers
that do not change when a library is upgraded, so a machine with other versions
loads them too, while any change to the task's sources, the sizes or the training
settings gives another key and `build_trained_pair` trains again (minutes). The
full recipe of the build that was shipped, library versions included, is saved as
`recipe.json` next to the checkpoints. `python -m hippo_testbed --ship-trained-pair
[--merge-size N]` trains (or reuses) the current recipe's build of that pair and ships
it (both the default pair and the fine-grid one are shipped); an opt-in test
(tests/testbed/test_trained_pair_rebuild.py) trains from the recipe and compares.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

SHIPPED_DIR = Path(__file__).parent / "trained_weights"
_WEIGHTS = "model.safetensors"
_RECIPE = "recipe.json"


def shipped_recipe(recipe: dict) -> dict:
    """The recipe the shipped weights are keyed by: all of it but the library versions."""
    return {k: v for k, v in recipe.items() if k != "libraries"}


def shipped_key(recipe: dict) -> str:
    blob = json.dumps(shipped_recipe(recipe), sort_keys=True, default=list).encode()
    return "trained-" + hashlib.sha256(blob).hexdigest()[:16]


def shipped_root(recipe: dict, shipped_dir: Path = SHIPPED_DIR) -> Path | None:
    """The shipped build for `recipe`, or None when the repository holds none."""
    root = shipped_dir / shipped_key(recipe)
    return root if (root / _RECIPE).is_file() else None


def _strip_padding(src: Path, dst: Path) -> None:
    """Copy checkpoint `src` to `dst` without its zero-output padding layers."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    config = json.loads((src / "config.json").read_text())
    padding = config.pop("hippo_cost_padding")
    trained = padding["trained_layers"]
    text = config["text_config"]
    text["num_hidden_layers"] = text["max_window_layers"] = trained
    if text.get("layer_types") is not None:
        text["layer_types"] = text["layer_types"][:trained]
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(_WEIGHTS, "config.json"))
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    # Saved checkpoints name decoder layers `model.layers.N` (transformers' published layout).
    padded = tuple(f"{prefix}.{i}." for i in range(trained, trained + padding["zero_output_layers"])
                   for prefix in ("model.layers", "model.language_model.layers"))
    with safe_open(str(src / _WEIGHTS), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if not k.startswith(padded)}
        metadata = f.metadata()
    save_file(tensors, str(dst / _WEIGHTS), metadata=metadata)


def ship(pair_root: Path, recipe: dict, shipped_dir: Path = SHIPPED_DIR) -> Path:
    """Copy the build at `pair_root` (made from `recipe`) into the repository; return its folder."""
    dest = shipped_dir / shipped_key(recipe)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    _strip_padding(pair_root / "target", dest / "target")
    shutil.copytree(pair_root / "draft", dest / "draft")
    (dest / _RECIPE).write_text(json.dumps(recipe, indent=1, sort_keys=True, default=list) + "\n")
    return dest


def materialize(shipped: Path, out: Path, padding_layers: int) -> None:
    """Write the servable pair from a shipped build: the draft as shipped, the target
    with its `padding_layers` zero-output layers rebuilt."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from hippo_testbed import models
    from hippo_testbed.cost_padding import cost_padded

    shutil.copytree(shipped / "draft", out / "draft")
    target = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(shipped / "target"), dtype=torch.float32)
    models.save_model(cost_padded(target.eval(), padding_layers), out / "target")
    # After saving: save_model drops the generation config transformers writes, not the processor's.
    shutil.copytree(shipped / "target", out / "target", ignore=shutil.ignore_patterns(_WEIGHTS, "config.json"),
                    dirs_exist_ok=True)
