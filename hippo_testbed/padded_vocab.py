"""A draft checkpoint whose embedding rows are padded differently from its target's.

Real checkpoints of one family share a tokenizer but pad their embeddings to
different row counts (Qwen2.5-VL-3B: 151,936 rows, 7B/72B: 152,064, for 151,665
tokenizer ids). :func:`with_vocab_rows` writes a copy of a tiny checkpoint with
``rows`` embedding and output rows, the same tokenizer, and its padding rows made
the output head's strongest: an unmasked draft would propose them often, so a
draft that never does shows the mask at work.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def with_vocab_rows(source: Path, rows: int, out: Path, tokenizer_ids: int) -> Path:
    """``source`` with its embedding and output head cut (or padded) to ``rows`` rows, at ``out``."""
    import torch
    from safetensors.torch import load_file, save_file

    if rows < tokenizer_ids:
        raise ValueError(f"rows={rows}: must hold the tokenizer's {tokenizer_ids} ids")
    shutil.copytree(source, out)
    for weights_file in out.glob("*.safetensors"):
        weights = load_file(weights_file)
        for name, tensor in weights.items():
            if name.endswith(("embed_tokens.weight", "lm_head.weight")):
                resized = torch.zeros(rows, tensor.shape[1], dtype=tensor.dtype)
                kept = min(rows, tensor.shape[0])
                resized[:kept] = tensor[:kept]
                if name.endswith("lm_head.weight"):
                    # Padding rows: copies of real rows, scaled up, so they outscore them.
                    padding = rows - tokenizer_ids
                    resized[tokenizer_ids:] = 4 * tensor[:padding]
                weights[name] = resized.contiguous()
        save_file(weights, weights_file, metadata={"format": "pt"})
    config_file = out / "config.json"
    config = json.loads(config_file.read_text())
    if "text_config" in config:
        config["text_config"]["vocab_size"] = rows
    if "vocab_size" in config:
        config["vocab_size"] = rows
    config_file.write_text(json.dumps(config, indent=2))
    return out
