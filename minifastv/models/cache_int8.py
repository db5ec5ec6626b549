"""An int8 KV cache (`--kv-cache int8`, `set_kv_cache(model, "int8")`): keys and values rounded to int8 with one
scale per token and head, and a decode step's attention computed from the int8 bytes.

A decode step's attention reads the whole cache. On a CPU the float cache holds fp32 (llama.py says why), 4 bytes
a value, read by SDPA at ~13 GB/s: at LLaVA-NeXT's 2,984 tokens that is 3.1 GB and ~0.24 s of a 0.53 s 7B step.
Here each head's scores are q . k over the int8 keys and its output p . v over the int8 values (stored transposed),
both by torch's weight-only int8 kernel, which reads one byte a value; the softmax is fp32. docs/cpu.md has the
measurements. The prefill attends over its exact keys and values; later passes see the rounded ones, and so does a
pruning method that reads a layer's attention back from the cache (FastV's ranking at layer K-1: its query is exact,
the keys rounded). CPU only; the server, which merges float caches, does not take it.
"""

from __future__ import annotations

import torch

from ..quant.linear import int8_kernel_fits
from .cache import KVCache, LayerCache

SLOTS = 64  # capacity is rounded up to a multiple of this: the kernel wants 16-wide rows on 32-byte boundaries
# A prefill's keys and values are rounded a slice of tokens at a time, each slice ~this many values: temporaries
# the size of the whole prompt's (35 MB for a 7B layer's keys at 2,112 tokens) take fresh pages every time, and
# rounding them in one piece took ~7x as long (40 against 6 ms for those keys; docs/cpu.md).
ROUND_VALUES = 1 << 19


def rounded(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (int8 [..., D], fp32 scale [...]) with x ~ int8 * scale: absmax over D / 127."""
    scale = x.float().abs().amax(-1).clamp_min(1e-30) / 127
    return torch.round(x.float() / scale[..., None]).to(torch.int8), scale


class Int8LayerCache(LayerCache):
    """One layer's keys k8 [B, H, capacity, D] and values transposed vt8 [B, H, D, capacity], int8, with their scales
    [B, H, capacity] (the keys' in bf16, as the kernel takes them); `k` and `v` give them back as floats."""

    def __init__(self, extra: int):
        self.k8 = self.k_scale = self.vt8 = self.v_scale = None
        super().__init__(extra)

    @property
    def k(self):
        return None if self.k8 is None else self.k8[:, :, :self.length] * self.k_scale[:, :, :self.length, None].float()

    @property
    def v(self):
        if self.vt8 is None:
            return None
        return self.vt8[..., :self.length].transpose(2, 3) * self.v_scale[:, :, :self.length, None]

    @k.setter
    def k(self, value):  # LayerCache.__init__ clears it; nothing else assigns it
        assert value is None

    @v.setter
    def v(self, value):
        assert value is None

    def store(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor):
        """Round k, v [B, H, T, D] into the next T slots (growing the buffers if they are full)."""
        T = k.shape[2]
        start, end = self.length, self.length + T
        if self.k8 is None or end > self.k8.shape[2]:
            self.grow(k, -(-(end + self.extra) // SLOTS) * SLOTS, valid)
        step = max(1, ROUND_VALUES // k[:, :, :1].numel())                    # tokens per slice
        for a in range(0, T, step):
            (k8, ks), (v8, vs) = rounded(k[:, :, a:a + step]), rounded(v[:, :, a:a + step])
            at = slice(start + a, start + a + k8.shape[2])
            self.k8[:, :, at], self.k_scale[:, :, at] = k8, ks.to(torch.bfloat16)
            self.vt8[..., at], self.v_scale[:, :, at] = v8.transpose(2, 3), vs
        self.valid[:, start:end] = valid
        self.length = end

    def grow(self, k: torch.Tensor, capacity: int, valid: torch.Tensor):
        B, H, _, D = k.shape
        old = self.k8, self.k_scale, self.vt8, self.v_scale, self.valid
        self.k8, self.vt8 = k.new_zeros(B, H, capacity, D, dtype=torch.int8), k.new_zeros(B, H, D, capacity,
                                                                                           dtype=torch.int8)
        self.k_scale = k.new_zeros(B, H, capacity, dtype=torch.bfloat16)
        self.v_scale = k.new_zeros(B, H, capacity, dtype=torch.float32)
        self.valid = valid.new_zeros(B, capacity)
        if old[0] is not None:   # a later turn: what is held moves over (slots: dim 2 of k8, the last of the rest)
            for new, before in zip((self.k8, self.k_scale, self.vt8, self.v_scale, self.valid), old):
                dim = 2 if new is self.k8 else -1
                new.narrow(dim, 0, self.length).copy_(before.narrow(dim, 0, self.length))

    def update(self, k, v, valid):
        """As LayerCache.update: the slots before these come back dequantized, these as given (exact)."""
        start = self.length
        before_k, before_v = (self.k, self.v) if start else (None, None)
        self.store(k, v, valid)
        if not start:
            return k, v, self.valid[:, :self.length]
        return (torch.cat((before_k.to(k.dtype), k), 2), torch.cat((before_v.to(v.dtype), v), 2),
                self.valid[:, :self.length])

    def attend_one(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """A decode step: store k, v [B, H_kv, 1, D] and return the attention of q [B, H, 1, D] over every valid
        slot, [B, 1, H * D] in bf16."""
        self.store(k, v, valid)
        B, H, _, D = q.shape
        group = H // self.k8.shape[1]                          # query heads per key-value head (GQA)
        heads = [(b, h, h // group) for b in range(B) for h in range(H)]
        query = (q[:, :, 0].float() * D ** -0.5).to(torch.bfloat16)
        scores = torch.cat([torch._weight_int8pack_mm(query[b, h:h + 1], self.k8[b, kv], self.k_scale[b, kv])
                            for b, h, kv in heads]).float().view(B, H, -1)
        scores = scores.masked_fill(~self.valid[:, None, :], float("-inf"))
        p = (scores.softmax(-1) * self.v_scale.repeat_interleave(group, dim=1)).to(torch.bfloat16).view(B * H, -1)
        ones = q.new_ones(D, dtype=torch.bfloat16)
        out = torch.cat([torch._weight_int8pack_mm(p[i:i + 1], self.vt8[b, kv], ones) for i, (b, _, kv) in
                         enumerate(heads)])
        return out.view(B, 1, H * D)


class Int8KVCache(KVCache):
    """One Int8LayerCache per decoder layer."""

    def __init__(self, n_layers: int, extra: int):
        self.layers = [Int8LayerCache(extra) for _ in range(n_layers)]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers if layer.k8 is not None
                   for t in (layer.k8, layer.k_scale, layer.vt8, layer.v_scale))


KV_CACHES = {"float": KVCache, "int8": Int8KVCache}


def set_kv_cache(model, kind: str):
    """Make the model's generations keep their keys and values in `kind` ("float" or "int8")."""
    if kind not in KV_CACHES:
        raise ValueError(f"kv cache must be one of {sorted(KV_CACHES)}, got {kind!r}")
    head_dim = model.config.text.head_dim
    if kind == "int8" and model.device.type != "cpu":
        raise ValueError(f"the int8 KV cache runs on the CPU only (the model is on {model.device})")
    if kind == "int8" and not int8_kernel_fits(head_dim):
        raise ValueError(f"the int8 KV cache needs a head size that is a multiple of 16 (torch's int8 kernel is "
                         f"wrong at other widths); this model's is {head_dim}")
    model.cache_type = KV_CACHES[kind]
