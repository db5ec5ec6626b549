"""Generation: one prefill over the prompt (pruning happens here, once), then one-token decode steps on the cache."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..inputs import check_inputs
from ..pruning import Pruner
from .cache import KVCache
from .llava import Prefill


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


class Stream:
    """Iterating yields (tokens [B], logits [B, vocab]) for each generated position, stopping early once every
    sample has produced eos_token_id (a finished sample keeps emitting it). Once the first token is out,
    `prefill` holds the prompt pass's report: kept image slots, token counts and FLOPs (models/llava.py, Prefill).
    `cache` continues a conversation: the prompt is appended to what the cache holds (positions go on from
    `position`, the `position` of the previous Stream), and the cache is kept. After iterating, `cache` holds
    the prompt and every generated token but the last, and `position` is the last token's position.
    """

    def __init__(self, model, input_ids, pixel_values=None, *, max_new_tokens: int, attention_mask=None,
                 prune: Pruner | None = None, temperature: float = 0.0, top_p: float = 1.0,
                 eos_token_id: int | None = None, generator: torch.Generator | None = None,
                 cache: KVCache | None = None, position: torch.Tensor | None = None, **visual):
        _check_args(max_new_tokens, temperature, top_p)
        if attention_mask is not None and not attention_mask[:, -1].bool().all():
            raise ValueError("generate needs left padding: attention_mask must be 1 at the last position of every row")
        self.model, self.input_ids, self.pixel_values = model, input_ids, pixel_values
        self.attention_mask, self.visual = attention_mask, visual  # visual: a family's other inputs (videos)
        self.max_new_tokens, self.prune, self.eos_token_id = max_new_tokens, prune, eos_token_id
        self.temperature, self.top_p, self.generator = temperature, top_p, generator
        self.prefill: Prefill | None = None
        self.cache, self.position = cache, position
        # The context is checked before anything is allocated: the cache is sized by max_new_tokens.
        check_inputs(model.config, input_ids, pixel_values, attention_mask)
        _, length = model.merged_slots(input_ids)
        held = 0 if position is None else int(position.max())
        if held + length + max_new_tokens > model.config.text.max_seq_len:
            before = f", after {held} in the conversation" if held else ""
            raise ValueError(f"prompt ({length} tokens with images{before}) + max_new_tokens ({max_new_tokens}) "
                             f"exceeds the context of {model.config.text.max_seq_len}")

    @torch.inference_mode()
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        model, max_new = self.model, self.max_new_tokens
        cache = self.cache = model.cache_type(model.config.text.n_layers, max_new) if self.cache is None else self.cache
        pre = model.prefill(self.input_ids, self.pixel_values, attention_mask=self.attention_mask, prune=self.prune,
                            cache=cache, last_only=True, start_position=self.position, **self.visual)
        self.prefill, self.position = pre, pre.next_position
        logits, position = pre.logits[:, -1], pre.next_position
        done = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
        for step in range(max_new):
            tokens = sample(logits, self.temperature, self.top_p, self.generator)
            if self.eos_token_id is not None:
                tokens = tokens.masked_fill(done, self.eos_token_id)
                done |= tokens == self.eos_token_id
            yield tokens, logits
            if bool(done.all()) or step == max_new - 1:
                return
            logits = model.decode_step(tokens, position, cache)
            position = position + 1  # generated tokens continue the ORIGINAL positions, pruned or not
            self.position = position


def stream(model, input_ids, pixel_values=None, **kwargs) -> Stream:
    """Generation one position at a time; see Stream for the keyword arguments and what it yields."""
    return Stream(model, input_ids, pixel_values, **kwargs)


def generate(model, input_ids, pixel_values=None, *, max_new_tokens: int, return_logits: bool = False, **kwargs):
    """Generated ids [B, n_new] (n_new < max_new_tokens when every sample stopped at EOS); with return_logits,
    also the logits that chose them [B, n_new, vocab]. Keyword arguments as in Stream."""
    steps = list(stream(model, input_ids, pixel_values, max_new_tokens=max_new_tokens, **kwargs))
    ids = torch.stack([tokens for tokens, _ in steps], dim=1)
    if return_logits:
        return ids, torch.stack([logits for _, logits in steps], dim=1)
    return ids
