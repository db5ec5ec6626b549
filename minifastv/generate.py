"""Generation: one prefill over the prompt (FastV prunes here, once), then one-token decode steps on the cache."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .cache import KVCache
from .fastv import FastV


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row of logits [B, vocab]: argmax when temperature is 0, else nucleus sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the tokens ranked above it already reach top_p; the first one always stays.
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _check_args(max_new_tokens, temperature, top_p):
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


@torch.inference_mode()
def stream(model, input_ids, pixel_values=None, *, max_new_tokens: int, attention_mask=None,
           fastv: FastV | None = None, temperature: float = 0.0, top_p: float = 1.0,
           eos_token_id: int | None = None, generator: torch.Generator | None = None
           ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (tokens [B], logits [B, vocab]) for each generated position, stopping early once every sample
    has produced eos_token_id. A finished sample keeps emitting eos_token_id."""
    _check_args(max_new_tokens, temperature, top_p)
    if attention_mask is not None and not attention_mask[:, -1].bool().all():
        raise ValueError("generate needs left padding: attention_mask must be 1 at the last position of every row")
    cache = KVCache(model.config.text.n_layers, extra=max_new_tokens)
    pre = model.prefill(input_ids, pixel_values, attention_mask=attention_mask, fastv=fastv, cache=cache,
                        last_only=True)
    total = pre.valid.shape[1] + max_new_tokens
    if total > model.config.text.max_seq_len:
        raise ValueError(f"prompt ({pre.valid.shape[1]} tokens with images) + max_new_tokens ({max_new_tokens}) "
                         f"exceeds the context of {model.config.text.max_seq_len}")
    logits, position = pre.logits[:, -1], pre.next_position
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=logits.device)
    for step in range(max_new_tokens):
        tokens = sample(logits, temperature, top_p, generator)
        if eos_token_id is not None:
            tokens = tokens.masked_fill(done, eos_token_id)
            done |= tokens == eos_token_id
        yield tokens, logits
        if bool(done.all()) or step == max_new_tokens - 1:
            return
        logits = model.decode_step(tokens, position, cache)
        position = position + 1  # generated tokens continue the ORIGINAL positions, pruned or not


def generate(model, input_ids, pixel_values=None, *, max_new_tokens: int, return_logits: bool = False, **kwargs):
    """Generated ids [B, n_new] (n_new < max_new_tokens when every sample stopped at EOS); with return_logits,
    also the logits that chose them [B, n_new, vocab]. Keyword arguments as in `stream`."""
    steps = list(stream(model, input_ids, pixel_values, max_new_tokens=max_new_tokens, **kwargs))
    ids = torch.stack([tokens for tokens, _ in steps], dim=1)
    if return_logits:
        return ids, torch.stack([logits for _, logits in steps], dim=1)
    return ids
