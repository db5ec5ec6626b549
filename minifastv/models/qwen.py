"""Qwen-7B, Qwen-VL's decoder: the LLaMA decoder (llama.py) with a bias on the query, key and value projections,
and two changes for prompts longer than the `context` (2,048) tokens it was trained on, both inert up to there
(modeling_qwen.py's use_logn_attn and use_dynamic_ntk):

- log-n attention: the query at position p (counting from 1) is scaled by log_context(p) once p > context, so
  the attention's entropy does not grow with the number of keys it spreads over;
- dynamic NTK rotary: a prompt of n tokens rotates with the base theta * a^(d / (d - 2)), head size d,
  a = 2^ceil(log2(n / context) + 1) - 1 (1 up to the context, 3 up to twice it, 7 up to four times), chosen at
  the conversation's first prefill and kept for the rest of it, as Qwen keeps the alpha it cached.

Where Qwen counts slots, each sample here counts its own tokens: a sample's alpha comes from its own prompt length
(Qwen's: the batch's padded length) and the log-n scale from the rotary position (Qwen's: the slot, left padding
included), so that a sample answers alike alone and in a batch. Qwen turns both off in training mode; here they
are always on (they change nothing below the context, where every training prompt of this project lies).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import TextConfig
from .cache import KVCache
from .llama import Attention, Llama, Sequence


def ntk_alpha(n_tokens: torch.Tensor, context: int) -> torch.Tensor:
    """[B] prompt lengths -> Qwen's dynamic NTK alpha [B] (float): 2^ceil(log2(n / context) + 1) - 1, at least 1."""
    steps = torch.ceil(torch.log2(n_tokens.double() / context) + 1)
    return (2 ** steps - 1).clamp(min=1)


def logn_scale(positions: torch.Tensor, context: int) -> torch.Tensor:
    """Qwen's log-n query scale at rotary positions [B, T] (0-based): log_context(p + 1) past the context, else 1."""
    p = positions.double() + 1
    return torch.where(p > context, p.log() / math.log(context), 1.0)


class QwenAttention(Attention):
    def __init__(self, cfg: TextConfig, context: int, logn: bool):
        super().__init__(cfg)
        self.context, self.logn = context, logn
        for name in ("q_proj", "k_proj", "v_proj"):   # c_attn's bias; c_proj (o_proj) has none
            setattr(self, name, nn.Linear(cfg.dim, getattr(self, name).out_features, bias=True))

    def queries(self, x, seq: Sequence):
        q = super().queries(x, seq)
        if not self.logn:
            return q
        scale = logn_scale(seq.positions[:, -x.shape[1]:], self.context)      # B, T
        return q * scale[:, None, :, None].to(q.dtype)


class QwenDecoder(Llama):
    """The Llama decoder with Qwen's attention; `sequence` gives each prompt its rotary base (a pass that continues
    a cache keeps the cache's: Llama.sequence)."""

    def __init__(self, cfg: TextConfig, context: int = 2048, logn: bool = True, dynamic_ntk: bool = True):
        super().__init__(cfg)
        self.context, self.dynamic_ntk = context, dynamic_ntk
        for layer in self.layers:
            layer.attn = QwenAttention(cfg, context, logn)

    def sequence(self, x, positions, valid, cache: KVCache | None = None, **slots) -> Sequence:
        if self.dynamic_ntk:
            d = self.cfg.head_dim
            slots["theta"] = self.cfg.rope_theta * ntk_alpha(valid.sum(1), self.context) ** (d / (d - 2))
        return super().sequence(x, positions, valid, cache, **slots)
