"""FLOPs as the FastV paper counts them: per decoder layer 4nd^2 + 2n^2d + 2ndm for n tokens, hidden d, MLP size
m, summed over the layers with the tokens each one runs on."""

from __future__ import annotations

from .base import Pruner, active_stages, stage_counts


def layer_flops(n: int, d: int, m: int) -> int:
    """FastV's per-layer count for n tokens: projections 4nd^2, attention 2n^2d, MLP 2ndm."""
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


def decoder_flops(cfg, layer_tokens: list[int]) -> int:
    """Theoretical prefill FLOPs of the decoder when layer i runs on layer_tokens[i] tokens."""
    return sum(layer_flops(n, cfg.dim, cfg.intermediate_size) for n in layer_tokens)


def scheduled_tokens(method: Pruner | None, n_layers: int, n_tokens: int, n_image: int) -> list[int]:
    """Tokens each decoder layer sees for a prompt of n_tokens with n_image image tokens, pruned by `method`."""
    stages, out, n_first = active_stages(method, n_layers), [], n_image
    for i in range(n_layers):
        if i in stages:
            dropped = n_image - stage_counts(method, stages[i], [n_image], [n_first])[0]
            n_tokens, n_image = n_tokens - dropped, n_image - dropped
        out.append(n_tokens)
    return out


def theoretical_flops(cfg, n_tokens: int, n_image_tokens: int, method: Pruner | None) -> tuple[int, int]:
    """(FLOPs with the method's schedule, FLOPs without) for a prefill of n_tokens, n_image_tokens of them
    image tokens; a planning figure: the model reports the count of the pass it ran (Prefill.flops)."""
    pruned = decoder_flops(cfg, scheduled_tokens(method, cfg.n_layers, n_tokens, n_image_tokens))
    return pruned, decoder_flops(cfg, [n_tokens] * cfg.n_layers)

