"""How the testbed's random models get their weights: seeded, wide, and optionally a shared bigram backbone.

Default init (std 0.02) makes tiny models emit one token forever, whatever the
input, which would blind every lossless/acceptance test. `redraw_weights`
therefore redraws every matrix from a wide seeded normal, and
`apply_bigram_backbone` can make a target and a draft share a bigram table so
that the draft agrees with the target on part of the greedy tokens, like a real
draft would. `models` and `llava_onevision` build their checkpoints with them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class InitSpec:
    """How weights are drawn: a wide normal, plus the optional shared bigram backbone.

    bigram_strength: 0 disables the backbone. Otherwise a token's embedding norm is
    `bigram_strength * exp(bigram_spread * z_token)` times the norm the decoder
    layers add to the residual stream (z_token ~ N(0, 1), the same for target and
    draft). Larger strength: both models follow the shared bigram table more often
    (more draft/target agreement); smaller: the layers, hence the video and the
    prompt, decide more tokens. The per-token spread mixes both regimes within one
    output instead of switching all positions at one threshold.
    """

    seed: int = 0
    std: float = 0.15
    bigram_strength: float = 0.0
    bigram_spread: float = 1.0
    bigram_seed: int = 1234
    bigram_logit_scale: float = 8.0


def redraw_weights(model, init: InitSpec) -> None:
    """Overwrite every parameter deterministically: matrices ~ N(0, std), norms 1, biases 0.

    Parameters are visited in name order with one private generator, so the
    weights depend only on `init` and the architecture, never on global RNG state
    or on transformers' own initialisation.
    """
    import torch

    gen = torch.Generator().manual_seed(init.seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if param.ndim >= 2:
                param.copy_(torch.randn(param.shape, generator=gen) * init.std)
            elif "norm" in name or "ln_q" in name:
                param.fill_(1.0)
            else:
                param.zero_()


def residual_update_norm(model, token_ids) -> float:
    """Mean norm of what the decoder layers add to the residual stream, per position."""
    import torch

    captured = {}
    final_norm = model.get_decoder().norm
    handle = final_norm.register_forward_hook(lambda mod, args, out: captured.setdefault("h", args[0]))
    try:
        with torch.no_grad():
            model.get_decoder()(input_ids=token_ids[None])
    finally:
        handle.remove()
    embeds = model.get_input_embeddings().weight[token_ids]
    return float((captured["h"][0] - embeds).norm(dim=-1).mean())


def apply_bigram_backbone(model, init: InitSpec, num_ordinary_tokens: int) -> None:
    """Make greedy decoding follow a shared bigram table x -> g(x), perturbed by the layers.

    g is a seeded permutation of the ordinary (BPE) tokens, identical for every model
    built with the same `bigram_seed`. Each model keeps its own random embedding
    directions u[x]; the embeddings are rescaled to `bigram_strength` times the norm
    the layers add to the residual stream, and lm_head row g(x) is set to u[x] so
    that, after the final RMSNorm, logit[g(y)] = bigram_logit_scale * cos(h, u[y]).
    Where the embedding dominates h, both target and draft predict g(x) and agree;
    where the context (video, question) dominates, they generally do not. Rows of
    added/special tokens stay zero: neither model ever emits them.
    """
    import torch

    gen = torch.Generator().manual_seed(init.bigram_seed)
    successor = torch.randperm(num_ordinary_tokens, generator=gen)
    embed = model.get_input_embeddings().weight
    token_scale = torch.exp(init.bigram_spread * torch.randn(embed.shape[0], 1, generator=gen))
    probe = torch.randint(0, num_ordinary_tokens, (64,), generator=gen)
    with torch.no_grad():
        reference = residual_update_norm(model, probe)
        units = embed / embed.norm(dim=-1, keepdim=True)
        embed.copy_(units * token_scale * (init.bigram_strength * reference))
        head = model.get_output_embeddings().weight
        head.zero_()
        head[successor] = units[:num_ordinary_tokens] * (init.bigram_logit_scale / units.shape[-1] ** 0.5)
