"""Continuous batching's cache surgery: requests that finished leave the batch, and newly prefilled ones join it."""

from __future__ import annotations

import torch

from ..models.cache import KVCache


def keep_rows(cache: KVCache, rows: torch.Tensor) -> None:
    """Keep only the batch rows `rows` [B'] (a server drops the requests that finished)."""
    theta = cache.layers[0].theta
    theta = None if theta is None else theta[rows]   # one tensor for every layer, as the prefill left it
    for layer in cache.layers:
        layer.k, layer.v, layer.valid = layer.k[rows], layer.v[rows], layer.valid[rows]
        layer.shift = None if layer.shift is None else layer.shift[rows]
        layer.theta = theta


def concat(caches: list[KVCache], extra: int) -> KVCache:
    """The rows of several caches as one batch: each layer's rows left-padded (invalid slots) to the longest,
    with room for `extra` more tokens. Layers may now differ in which slots are valid, so each layer whose
    validity differs from the layer before starts a segment of its own (a mask each)."""
    out = KVCache(len(caches[0].layers), extra)
    thetas = [c.layers[0].theta for c in caches]  # a rotary base per sample (Qwen-VL's: every prefill sets it)
    theta = None if thetas[0] is None else torch.cat(thetas)   # one tensor for every layer, as a prefill leaves it
    for i, parts in enumerate(zip(*(c.layers for c in caches))):
        length = max(p.length for p in parts)
        layer, first = out.layers[i], parts[0]
        B, (_, H, _, D) = sum(p.k.shape[0] for p in parts), first.k.shape
        layer.k, layer.v = first.k.new_zeros(B, H, length + extra, D), first.v.new_zeros(B, H, length + extra, D)
        layer.valid, layer.length, layer.theta = first.valid.new_zeros(B, length + extra), length, theta
        row = 0
        for p in parts:
            b, pad = p.k.shape[0], length - p.length
            layer.k[row:row + b, :, pad:length] = p.k[:, :, :p.length]
            layer.v[row:row + b, :, pad:length] = p.v[:, :, :p.length]
            layer.valid[row:row + b, pad:length] = p.valid[:, :p.length]
            row += b
        if any(p.shift is not None for p in parts):
            layer.shift = torch.cat([p.valid.new_zeros(p.k.shape[0], dtype=torch.long) if p.shift is None
                                     else p.shift for p in parts])
        before = out.layers[i - 1] if i else None
        same = before is not None and torch.equal(before.valid[:, :before.length], layer.valid[:, :length])
        layer.segment = before.segment if same else (0 if before is None else before.segment + 1)
    return out
