"""Cost padding: a trained target made as costly per step as a real target is to its draft.

Zero-output decoder layers appended after the trained ones add exactly zero to the
residual stream, so the answers are unchanged, while the engine runs their attention
and MLP for real.
"""

from __future__ import annotations


def cost_padded(model, extra_layers: int):
    """`model` with `extra_layers` zero-output decoder layers appended (same function, more compute).

    Each appended layer copies the last trained layer's weights, then zeroes
    `o_proj` and `down_proj`: its attention and MLP run, and add exactly zero.
    """
    import copy

    import torch

    if extra_layers < 0:
        raise ValueError(f"extra_layers must be >= 0, got {extra_layers}")
    trained = model.config.text_config.num_hidden_layers
    config = copy.deepcopy(model.config)
    config.text_config.num_hidden_layers = trained + extra_layers
    config.text_config.max_window_layers = trained + extra_layers
    if getattr(config.text_config, "layer_types", None) is not None:
        config.text_config.layer_types = ["full_attention"] * (trained + extra_layers)
    config.hippo_cost_padding = {
        "trained_layers": trained, "zero_output_layers": extra_layers,
        "note": "cost-padded: layers after the trained ones have zero o_proj and down_proj, "
                "so they add nothing to the residual stream (identical outputs, real compute)",
    }
    padded = type(model)(config).to(torch.float32).eval()
    state = model.state_dict()
    last = f"model.language_model.layers.{trained - 1}."
    for i in range(trained, trained + extra_layers):
        for key in [k for k in state if k.startswith(last)]:
            name = key[len(last):]
            value = state[key]
            if name in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
                value = torch.zeros_like(value)
            state = {**state, f"model.language_model.layers.{i}.{name}": value.clone()}
    missing, unexpected = padded.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"cost padding left weights unset: missing {missing}, unexpected {unexpected}")
    return padded
