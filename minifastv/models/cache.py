"""KV cache, each layer its own buffers and length: with FastV, layers >= K cache only the tokens that survived."""

from __future__ import annotations

import torch


class LayerCache:
    """Keys, values and a key-validity mask (False at left padding) for one attention layer. Buffers are allocated
    at the first update (the prefill), sized to that sequence plus `extra` slots for the tokens still to come."""

    def __init__(self, extra: int):
        self.extra = extra
        self.k = self.v = self.valid = None
        self.length = 0
        self.segment = 0  # the stretch of layers between pruning stages it belongs to (one attention mask each)
        self.shift = None  # [B] positions given up by renumbering stages before it (None: positions are original)
        self.theta = None  # [B] the rotary base its keys were rotated with, per sample (None: the config's)

    def update(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor):
        """Append k, v [B, H, T, D] and valid [B, T]; return everything cached so far."""
        B, H, T, D = k.shape
        if self.k is None:
            capacity = T + self.extra
            self.k, self.v = k.new_empty(B, H, capacity, D), v.new_empty(B, H, capacity, D)
            self.valid = valid.new_zeros(B, capacity)
        start, end = self.length, self.length + T
        if end > self.k.shape[2]:  # a later turn of a conversation: room for it and `extra` more
            grow = end + self.extra - self.k.shape[2]
            self.k, self.v = (torch.cat((t, t.new_empty(B, H, grow, D)), dim=2) for t in (self.k, self.v))
            self.valid = torch.cat((self.valid, self.valid.new_zeros(B, grow)), dim=1)
        self.k[:, :, start:end], self.v[:, :, start:end] = k, v
        self.valid[:, start:end] = valid
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end], self.valid[:, :end]

    def valid_after(self, valid: torch.Tensor) -> torch.Tensor:
        """The key validity [B, S] that update(..., valid) will return, without writing anything."""
        return valid if self.valid is None else torch.cat((self.valid[:, :self.length], valid), dim=1)


class KVCache:
    """One LayerCache per decoder layer."""

    def __init__(self, n_layers: int, extra: int):
        self.layers = [LayerCache(extra) for _ in range(n_layers)]

    def __getitem__(self, i: int) -> LayerCache:
        return self.layers[i]

    def lengths(self) -> list[int]:
        return [layer.length for layer in self.layers]

    def nbytes(self) -> int:
        """Bytes held by the key and value buffers (allocated capacity, masks excluded)."""
        return sum(t.numel() * t.element_size() for layer in self.layers if layer.k is not None
                   for t in (layer.k, layer.v))
