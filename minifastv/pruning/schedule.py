"""A method's stages applied to the decoder's sequence, one layer at a time: the only place where pruning
touches the decoder loop (models/llama.py, Llama.forward)."""

from __future__ import annotations

import time

import torch

from .base import PruneContext, Pruner, active_stages, keep_slots, stage_counts


class Schedule:
    """The stages of `method` (None: no pruning) for `decoder`, starting from the first layer's sequence."""

    def __init__(self, method: Pruner | None, decoder, seq):
        self.method, self.decoder = method, decoder
        self.stages = active_stages(method, len(decoder.layers))
        self.n_first = seq.image.sum(1).tolist() if self.stages else []  # image tokens before any stage
        self.select_s = 0.0                                                 # seconds spent choosing

    def stage(self, layer: int, seq, before, cache):
        """`seq` as layer `layer` runs on it: shortened to the kept slots if a stage is due there (THE rule,
        keep_slots: every valid text slot and each sample's chosen image slots), else unchanged. `before` is
        the sequence that entered the previous layer and `cache` the pass's KVCache, for the methods that read
        them."""
        if layer not in self.stages:
            return seq
        n_keep = stage_counts(self.method, self.stages[layer], seq.image.sum(1).tolist(), self.n_first)
        ctx = PruneContext(layer, seq, torch.tensor(n_keep, device=seq.x.device), self.decoder, before, cache)
        start = time.perf_counter()
        keep, kept_valid, hidden = keep_slots(self.method, ctx)  # hidden: merged, for methods that merge tokens
        self.select_s += time.perf_counter() - start
        if self.method.renumber:  # each kept slot moves back by the valid slots dropped before it
            dropped = seq.valid & ~torch.zeros_like(seq.valid).scatter(1, keep, kept_valid)
            seq = seq.renumbered(dropped, self.decoder.rotary)
        return seq.gather(keep, kept_valid, hidden)
