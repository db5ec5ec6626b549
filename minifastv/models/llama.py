"""LLaMA decoder: RMSNorm, rotary embeddings at explicit positions, SDPA attention with GQA, SwiGLU.

The decoder takes embeddings rather than token ids, because LLaVA splices image features into the
sequence before the first layer. What a layer runs on is one value, a `Sequence`: hidden states, the
rotary position of each slot (after pruning they are no longer 0..T-1), its rotary tables, validity (False
at padding) and which slots hold image tokens. A pruning stage (pruning/schedule.py) maps it to a shorter
one before its layer; the layers after it then cache and attend over the kept slots only.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..config import TextConfig
from ..pruning import Pruner, Schedule
from .cache import KVCache, LayerCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32: the mean of squares overflows fp16 and loses precision in bf16.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Embedding(nn.Embedding):
    """nn.Embedding that skips initialising a meta table (a loader assigns it; a first meta normal_() takes 2 s)."""

    def reset_parameters(self):
        if not self.weight.is_meta:
            super().reset_parameters()


class Rotary:
    """Rotary tables (cos, sin) [B, T, head_dim] at integer positions [B, T] in fp32 (bf16 positions past 256 are
    not exact integers), rotate-half layout (both halves share a frequency); theta [B]: a base per sample if given."""

    def __init__(self, head_dim: int, theta: float):
        self.head_dim, self.theta = head_dim, theta

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype, theta: torch.Tensor | None = None):
        exponent = torch.arange(0, self.head_dim, 2, device=positions.device, dtype=torch.int64).float() / self.head_dim
        base = self.theta if theta is None else theta.to(positions.device).float()[:, None, None]
        inv_freq = 1.0 / (base ** exponent)                        # head_dim/2 (or B, 1, head_dim/2)
        freqs = positions.float()[..., None] * inv_freq            # B, T, head_dim/2
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x [B, H, T, D]; cos, sin [B, T, D]."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def attention_mask(valid: torch.Tensor, n_queries: int):
    """Boolean SDPA mask [B, 1, T, S] for the last T of S slots, or None when plain causal attention suffices.

    Slots are in sequence order even after pruning, so causality is a comparison of slot indices. A query
    always sees its own slot: a padding query would otherwise see nothing and SDPA would return NaN,
    which leaks into later layers through 0 * NaN.
    """
    S, T = valid.shape[1], n_queries
    if (T == 1 or T == S) and bool(valid.all()):
        return None
    q_slot = torch.arange(S - T, S, device=valid.device)[:, None]   # T, 1
    k_slot = torch.arange(S, device=valid.device)[None, :]          # 1, S
    return (k_slot <= q_slot) & (valid[:, None, None, :] | (k_slot == q_slot))


def query_attention(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Head-averaged attention probabilities of the last Q queries over all S keys, in fp32.

    q [B, H, Q, D] (the queries of the last Q slots), k [B, H_kv, S, D] (rotary already applied), valid
    [B, S]. Returns [B, Q, S]. Cost: Q rows, O(Q S) per head, instead of the S x S matrix that eager
    attention would build; FastV needs one row (Q = 1), where causality reduces to the padding.
    """
    H_kv, Q, D, S = k.shape[1], q.shape[2], k.shape[-1], k.shape[2]
    q = rearrange(q.float(), "b (hk g) q d -> b hk g q d", hk=H_kv)  # query head h uses kv head h // g
    scores = torch.einsum("bhgqd,bhsd->bhgqs", q, k.float()) / math.sqrt(D)
    causal = torch.arange(S, device=k.device)[None, :] <= torch.arange(S - Q, S, device=k.device)[:, None]  # Q, S
    scores = scores.masked_fill(~(causal & valid[:, None, :])[:, None, None], float("-inf"))
    return scores.softmax(dim=-1).mean(dim=(1, 2))


def take(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t [B, S] or [B, S, C] at slots index [B, L] -> [B, L] or [B, L, C]."""
    return t.gather(1, index if t.ndim == 2 else index[..., None].expand(-1, -1, t.shape[-1]))


@dataclass(frozen=True)
class Sequence:
    """The slots a decoder layer runs on, B samples of T slots each. A pruning stage maps it to a shorter one."""

    x: torch.Tensor                      # [B, T, C] hidden states
    positions: torch.Tensor              # [B, T] rotary positions
    cos: torch.Tensor                    # [B, T, head_dim] rotary tables at `positions` (less `shift`, see there)
    sin: torch.Tensor
    valid: torch.Tensor                  # [B, T] False at padding
    image: torch.Tensor | None = None    # [B, T] slots that hold image tokens (prefill)
    vision_scores: torch.Tensor | None = None  # [B, T] at image slots, the vision side's score a method asked for
    n_patches: int | None = 0            # tokens per visual group (consecutive); None: groups of two sizes
    slots: torch.Tensor | None = None    # [B, T] the input slot of each slot; None while nothing is pruned
    segment: int = 0                     # stages applied: the layers of one segment attend over the same slots
    # [B] positions given up by renumbering stages (pruning methods with `renumber`). In the prefill they are
    # already taken off `positions`; in a later pass each layer's cache says which shift its tables apply.
    shift: torch.Tensor | None = None
    theta: torch.Tensor | None = None    # [B] rotary base per sample (Rotary); a cache keeps its prefill's
    masks: dict = field(default_factory=dict, compare=False, repr=False)  # attention masks by segment

    def mask(self, cache: LayerCache | None):
        """The attention mask (attention_mask) over the cached and new slots, made once per segment."""
        segment = self.segment if cache is None else cache.segment
        if segment not in self.masks:
            kv_valid = self.valid if cache is None else cache.valid_after(self.valid)
            self.masks[segment] = attention_mask(kv_valid, self.x.shape[1])
        return self.masks[segment]

    def entering(self, cache: LayerCache | None, rotary: Rotary) -> Sequence:
        """The sequence as the layer owning `cache` runs on it. A prefill marks the cache with its segment, shift
        and rotary base; a later pass takes the rotary tables back to the positions the cache was filled at."""
        if cache is not None and cache.length == 0:
            cache.segment, cache.shift, cache.theta = self.segment, self.shift, self.theta
        if cache is None or cache.shift is self.shift:
            return self
        positions = self.positions if cache.shift is None else self.positions - cache.shift[:, None]
        cos, sin = rotary(positions, self.x.dtype, self.theta)
        return dataclasses.replace(self, cos=cos, sin=sin, shift=cache.shift)

    def renumbered(self, dropped: torch.Tensor, rotary: Rotary) -> Sequence:
        """Each slot moved back by the `dropped` [B, T] slots before it, as if they had never been there."""
        positions = self.positions - dropped.long().cumsum(1)
        shift = dropped.sum(1) + (0 if self.shift is None else self.shift)
        cos, sin = rotary(positions, self.x.dtype, self.theta)
        return dataclasses.replace(self, positions=positions, cos=cos, sin=sin, shift=shift)

    def gather(self, keep: torch.Tensor, kept_valid: torch.Tensor, x: torch.Tensor) -> Sequence:
        """The slots `keep` [B, L] (validity kept_valid [B, L]) of this sequence, hidden states taken from x."""
        vision_scores = None if self.vision_scores is None else take(self.vision_scores, keep)
        return Sequence(take(x, keep), take(self.positions, keep), take(self.cos, keep), take(self.sin, keep),
                        kept_valid, take(self.image, keep) & kept_valid,  # padding may point at a dropped image slot
                        vision_scores, self.n_patches, keep if self.slots is None else self.slots.gather(1, keep),
                        self.segment + 1, self.shift, self.theta)


class DecoderOutput(NamedTuple):
    hidden: torch.Tensor                     # [B, T', C] after the final norm
    seq: Sequence                            # the last layer's sequence: its slots (None unpruned) and validity
    layer_tokens: torch.Tensor               # [n_layers, B] tokens each layer ran on
    attention: list[torch.Tensor] | None     # per layer [B, Q, S] with attention_rows = Q > 0
    select_s: float                          # seconds spent choosing the kept tokens (the methods' select + rule)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def heads(self, t):
        return rearrange(t, "b t (h d) -> b h t d", d=self.head_dim)

    def keys(self, x, cos, sin):
        """The keys [B, H_kv, T, D] of x (normed input) after rotary, as attention uses them."""
        return apply_rope(self.heads(self.k_proj(x)), cos, sin)

    def queries(self, x, seq: Sequence):
        """The queries [B, H, T, D] of x (normed input at the last T slots of seq) after rotary."""
        return apply_rope(self.heads(self.q_proj(x)), seq.cos[:, -x.shape[1]:], seq.sin[:, -x.shape[1]:])

    def rows(self, x, seq: Sequence, n: int, cache: LayerCache | None = None):
        """[B, n, S]: the head-mean attention of the last n slots over all slots, as this layer computes it
        (x: the layer's normed input). Once the layer has run, its cache holds the keys, so they are reused."""
        q = self.queries(x[:, -n:], seq)
        if cache is not None and cache.length:
            return query_attention(q, cache.k[:, :, :cache.length], cache.valid[:, :cache.length])
        return query_attention(q, self.keys(x, seq.cos, seq.sin), seq.valid)

    def forward(self, x, seq: Sequence, cache: LayerCache | None = None):
        """x [B, T, C] (normed input) at the slots of `seq`; the cache, if any, gets the new keys and values."""
        T = x.shape[1]
        q, k, v = self.queries(x, seq), self.keys(x, seq.cos, seq.sin), self.heads(self.v_proj(x))
        if cache is not None and T == 1 and hasattr(cache, "attend_one"):   # an int8 cache: models/cache_int8.py
            return self.o_proj(cache.attend_one(q, k, v, seq.valid).to(x.dtype))
        if x.device.type == "cpu":
            # torch's CPU attention takes as long for a prefill in fp32 as in bf16, but one bf16 query (a decode
            # step) ~9x longer than one fp32 query: on a CPU attention and the KV cache are fp32 (docs/cpu.md)
            q, k, v = q.float(), k.float(), v.float()
        mask = seq.mask(cache)                                     # over the cached slots and these
        if cache is not None:
            k, v, _ = cache.update(k, v, seq.valid)                # now S >= T slots
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(rearrange(y, "b h t d -> b t (h d)").to(x.dtype))


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, seq: Sequence, cache: LayerCache | None = None) -> torch.Tensor:
        x = seq.x + self.attn(self.attn_norm(seq.x), seq, cache)
        return x + self.mlp(self.mlp_norm(x))

    def attention_rows(self, seq: Sequence, n: int, cache: LayerCache | None = None) -> torch.Tensor:
        """[B, n, S]: the head-mean attention of seq's last n slots in this block (seq: its input)."""
        return self.attn.rows(self.attn_norm(seq.x), seq, n, cache)

    def keys(self, seq: Sequence) -> torch.Tensor:
        """[B, S, H_kv * D]: this block's keys after rotary for its input seq, as its cache holds them."""
        return rearrange(self.attn.keys(self.attn_norm(seq.x), seq.cos, seq.sin), "b h t d -> b t (h d)")


class Llama(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta)
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def sequence(self, x, positions, valid, cache: KVCache | None = None, **slots) -> Sequence:
        """Embeddings x [B, T, C] at `positions` [B, T], `valid` [B, T] False at padding, as the first layer's
        Sequence; `slots`: its other fields. A pass continuing `cache` keeps the rotary base its prefill chose."""
        if cache is not None and cache[0].length:
            slots["theta"] = cache[0].theta
        return Sequence(x, positions, *self.rotary(positions, x.dtype, slots.get("theta")), valid, **slots)

    def forward(self, seq: Sequence, cache: KVCache | None = None, prune: Pruner | None = None,
                attention_rows: int = 0) -> DecoderOutput:
        """Run the decoder on `seq` (filling or continuing `cache`). With `prune` (prefill only) each of the
        method's stages shortens the sequence before its layer. attention_rows = Q > 0 also returns each layer's
        head-mean attention of the last Q slots over the slots it saw [B, Q, S] (analyze)."""
        schedule = Schedule(prune, self, seq)
        before, tokens, rows = None, [], []       # before: the sequence that entered the previous layer
        for i, layer in enumerate(self.layers):
            seq = schedule.stage(i, seq, before, cache)
            layer_cache = None if cache is None else cache[i]
            before = seq = seq.entering(layer_cache, self.rotary)
            seq = dataclasses.replace(seq, x=layer(seq, layer_cache))
            if attention_rows:
                rows.append(layer.attention_rows(before, attention_rows, layer_cache))
            tokens.append(seq.valid.sum(1))
        return DecoderOutput(self.norm(seq.x), seq, torch.stack(tokens), rows or None, schedule.select_s)
