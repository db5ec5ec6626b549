"""LLaMA decoder: RMSNorm, rotary embeddings at explicit positions, SDPA attention with GQA, SwiGLU.

The decoder takes embeddings rather than token ids, because LLaVA splices image features into the
sequence before the first layer. Every layer sees `positions` (rotary position of each slot) and `valid`
(False at padding) explicitly: after pruning the positions are no longer 0..T-1.

Pruning happens in Llama.forward, by one rule for every method (pruning/base.py): before a stage's layer,
gather the kept slots' hidden states, rotary tables, validity and positions; later layers then cache and
attend over the kept slots only.
"""

from __future__ import annotations

import math
import time
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .cache import KVCache, LayerCache
from .config import TextConfig
from .pruning import PruneContext, Pruner, active_stages, keep_slots
from .pruning.base import stage_counts


class DecoderOutput(NamedTuple):
    hidden: torch.Tensor                     # [B, T', C] after the final norm
    slots: torch.Tensor | None               # [B, T'] input slot of each output slot; None when nothing was pruned
    valid: torch.Tensor                      # [B, T'] validity of the output slots
    layer_tokens: torch.Tensor               # [n_layers, B] tokens each layer ran on
    attention: list[torch.Tensor] | None     # per layer [B, Q, S] with attention_rows = Q > 0
    select_s: float                          # seconds spent choosing the kept tokens (the methods' select + rule)


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


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos and sin [B, T, head_dim] for integer positions [B, T], computed in fp32 (bf16 positions past 256
    are not even exact integers)."""
    exponent = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta ** exponent)                      # head_dim/2
    freqs = positions.float()[..., None] * inv_freq            # B, T, head_dim/2
    emb = torch.cat((freqs, freqs), dim=-1)                    # rotate-half layout: both halves share a frequency
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
    [B, S]. Returns [B, Q, S]. Cost: Q rows, O(Q S) per head, next to SDPA, instead of the S x S matrix
    that eager attention would build; FastV needs one row (Q = 1), where causality reduces to the padding.
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

    def rotated_keys(self, x, cos, sin):
        """The keys [B, T, H_kv * D] of x (normed input) after rotary, as the cache holds them."""
        return rearrange(apply_rope(self.heads(self.k_proj(x)), cos, sin), "b h t d -> b t (h d)")

    def last_row(self, x, cos, sin, valid):
        """[B, T]: the head-mean attention of the last slot over all slots of x (normed input), as this layer
        would compute it."""
        q = apply_rope(self.heads(self.q_proj(x[:, -1:])), cos[:, -1:], sin[:, -1:])
        return query_attention(q, apply_rope(self.heads(self.k_proj(x)), cos, sin), valid)[:, 0]

    def project(self, x, cos, sin):
        """q [B, H, T, D], k and v [B, H_kv, T, D], rotary embeddings applied to q and k."""
        q, k, v = (self.heads(proj(x)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x, cos, sin, valid, mask, cache: LayerCache | None = None, n_rows: int = 0):
        """x [B, T, C] at slots with validity `valid` [B, T]; `mask` from attention_mask over the cached and new
        slots. Returns the output [B, T, C] and, if n_rows > 0, the head-mean attention of the last n_rows
        queries over all keys [B, n_rows, S] (else None)."""
        T = x.shape[1]
        q, k, v = self.project(x, cos, sin)
        if x.device.type == "cpu":
            # torch's CPU attention kernel takes as long for a whole prefill in fp32 as in bf16, but one bf16
            # query (a decode step) runs ~9x slower than one fp32 query: on a CPU attention and the KV cache
            # are fp32 (measured at 632 keys, README "Running LLaVA-1.5-7B on a CPU").
            q, k, v = q.float(), k.float(), v.float()
        if cache is not None:
            k, v, valid = cache.update(k, v, valid)                # now S >= T slots
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        rows = query_attention(q[:, :, -n_rows:], k, valid) if n_rows else None
        return self.o_proj(rearrange(y, "b h t d -> b t (h d)").to(x.dtype)), rows


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

    def forward(self, x, cos, sin, valid, mask, cache=None, n_rows=0):
        h, rows = self.attn(self.attn_norm(x), cos, sin, valid, mask, cache, n_rows)
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), rows


class Llama(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def forward(self, x, positions, valid, cache: KVCache | None = None, prune: Pruner | None = None,
                image_mask: torch.Tensor | None = None, attention_rows: int = 0,
                vision_attention: torch.Tensor | None = None, n_patches: int = 0):
        """Run the decoder on embeddings x [B, T, C] at `positions` [B, T], with `valid` [B, T] False at padding.

        With `prune` (prefill only; `image_mask` [B, T] marks the image slots), each stage's layer and the
        layers after it run on the kept slots. Returns a DecoderOutput; with attention_rows = Q > 0 it holds
        each layer's head-mean attention of the last Q queries [B, Q, S].
        vision_attention [B, T] (the class token's attention at image slots) and n_patches (tokens per image)
        are handed to the pruning method.
        """
        stages = active_stages(prune, len(self.layers))
        rope = lambda p: rope_cos_sin(p, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)  # noqa: E731
        cos, sin = rope(positions)
        slots, row, segment, mask_segment, counts, rows, select_s = None, None, 0, None, [], [], 0.0
        n_first = image_mask.sum(1).tolist() if stages else None
        shift = applied = None  # renumbering methods: positions each sample gave up (prefill; applied: later passes)
        x_in = x                # the previous layer's input
        for i, layer in enumerate(self.layers):
            if i in stages:
                n_keep = stage_counts(prune, stages[i], image_mask.sum(1).tolist(), n_first)
                before = self.layers[i - 1] if i else None   # before the decoder there is no earlier layer
                ctx = PruneContext(i, x, image_mask, valid, positions, torch.tensor(n_keep, device=x.device),
                                   n_patches, row,
                                   keys=lambda: layer.attn.k_proj(layer.attn_norm(x)),  # noqa: B023
                                   vision_attention=vision_attention,
                                   previous_keys=None if before is None else lambda: before.attn.rotated_keys(
                                       before.attn_norm(x_in), cos, sin),  # noqa: B023
                                   attention_here=lambda: layer.attn.last_row(layer.attn_norm(x), cos, sin, valid),  # noqa: B023
                                   final_norm=self.norm)
                start = time.perf_counter()
                keep, kept_valid, x = keep_slots(prune, ctx)  # x: merged, for methods that merge tokens
                select_s += time.perf_counter() - start
                if prune.renumber:  # each kept slot moves back by the valid slots dropped before it
                    dropped = valid & ~torch.zeros_like(valid).scatter(1, keep, kept_valid)
                    positions = positions - dropped.long().cumsum(1)
                    shift = dropped.sum(1) + (0 if shift is None else shift)
                valid = kept_valid
                x, cos, sin, positions, image_mask = (take(t, keep) for t in (x, cos, sin, positions, image_mask))
                if prune.renumber:
                    cos, sin = rope(positions)
                vision_attention = None if vision_attention is None else take(vision_attention, keep)
                image_mask = image_mask & valid        # the padding of a pruned batch may point at a dropped image slot
                slots = keep if slots is None else slots.gather(1, keep)
                segment += 1
            layer_cache = cache[i] if cache is not None else None
            if layer_cache is not None and layer_cache.length == 0:
                layer_cache.segment, layer_cache.shift = segment, shift  # prefill: this segment's slots and shift
            elif layer_cache is not None and layer_cache.shift is not applied:
                # A later pass: the layers after a renumbering stage see positions moved back by its shift.
                applied = layer_cache.shift
                cos, sin = rope(positions if applied is None else positions - applied[:, None])
            # Layers between two stages attend over the same slots: one mask serves all of them.
            layer_segment = segment if layer_cache is None else layer_cache.segment
            if layer_segment != mask_segment:
                kv_valid = valid if layer_cache is None else layer_cache.valid_after(valid)
                mask, mask_segment = attention_mask(kv_valid, x.shape[1]), layer_segment
            need_row = prune is not None and prune.needs_attention and i + 1 in stages
            x_in = x
            x, layer_rows = layer(x, cos, sin, valid, mask, layer_cache, max(attention_rows, int(need_row)))
            row = layer_rows[:, -1] if need_row else None
            counts.append(valid.sum(1))
            rows.append(layer_rows)
        return DecoderOutput(self.norm(x), slots, valid, torch.stack(counts), rows if attention_rows else None,
                             select_s)
