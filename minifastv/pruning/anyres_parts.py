"""Other treatments of LLaVA-NeXT's packed image tokens than one ranked set (the default, as transformers lays
them into the sequence: base image, tiles and newline tokens all compete for the budget). Each is a named option
around any method that scores or picks slots, with its reason:

- keep_newlines ("newlines-kept"): the newline token that ends each row of the tile grid is always kept, inside
  the same budget; the others compete for the rest. The newlines carry no content of the image but its layout:
  the decoder was trained to read the grid row by row, and a criterion that ranks by content (attention,
  similarity) sees no reason to keep them, so the grid's rows run together once some are dropped.
- apart ("views-apart"): the base image (the whole picture squashed to one tile) and the tiles (the detail) each
  keep their share of the budget, in proportion to their tokens, each ranked only among its own. Ranked as one
  set, a criterion may spend the budget on one view and lose the other (FastV's attention favours a few regions
  wherever they lie).

The model tells the option where each part lies: LlavaNextModel.prefill binds every call's parts (anyres.parts
per image, at the merged slots) before the pass; other models have no parts, and the option refuses them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from ..anyres import BASE, NEWLINE, TILE
from .base import Pruner, chosen_slots

TREATMENTS = {"newlines-kept": {"keep_newlines": True}, "views-apart": {"apart": True},
              "newlines-kept+views-apart": {"keep_newlines": True, "apart": True}}


@dataclass(frozen=True)
class AnyresParts(Pruner):
    """`method` over LLaVA-NeXT's image tokens, with the newlines kept and/or the base image and the tiles ranked
    apart (module docstring). Its stages and counts are the method's; at each stage the method selects within
    each part with that part's share of the sample's budget."""

    method: Pruner
    keep_newlines: bool = False
    apart: bool = False
    parts: torch.Tensor | None = field(default=None, compare=False, repr=False)  # [B, T] per merged slot, bound

    needs_attention = property(lambda self: self.method.needs_attention)
    vision_score = property(lambda self: self.method.vision_score)
    renumber = property(lambda self: self.method.renumber)

    def __post_init__(self):
        if not isinstance(self.method, Pruner) or isinstance(self.method, AnyresParts):
            raise ValueError(f"AnyresParts takes a pruning method, got {self.method!r:.60}")
        if type(self.method).merge is not Pruner.merge:
            raise ValueError(f"{type(self.method).__name__} merges the tokens it drops into the kept ones, which "
                             "a selection made part by part cannot give it: use it on the packed tokens as one set")
        if not (self.keep_newlines or self.apart):
            raise ValueError("AnyresParts needs keep_newlines or apart (without either it is the method itself)")

    @property
    def name(self) -> str:
        return next(key for key, kw in TREATMENTS.items() if kw == {k: True for k in ("keep_newlines", "apart")
                                                                     if getattr(self, k)})

    def bound(self, parts: torch.Tensor) -> AnyresParts:
        """This option for one pass, over a batch whose merged slots are `parts` [B, T] (anyres.BASE, TILE,
        NEWLINE; 0 elsewhere)."""
        return dataclasses.replace(self, parts=parts)

    def stages(self, n_layers):
        return self.method.stages(n_layers)

    def count(self, stage, n_image, n_first):
        return self.method.count(stage, n_image, n_first)

    def select(self, ctx):
        if self.parts is None:
            raise ValueError(f"the {self.name} option applies to LLaVA-NeXT's images, and this model has no tiles")
        parts = self.parts.to(ctx.image_mask.device)
        parts = (parts if ctx.seq.slots is None else parts.gather(1, ctx.seq.slots)).masked_fill(~ctx.image_mask, 0)
        chosen, budget = torch.zeros_like(ctx.image_mask), ctx.n_keep.clone()
        if self.keep_newlines:
            chosen = parts == NEWLINE
            budget -= chosen.sum(1)
            if (budget < 0).any():
                raise ValueError(f"{self.name}: a sample keeps {ctx.n_keep.tolist()} image tokens, fewer than its "
                                 f"{chosen.sum(1).tolist()} newline tokens")
        groups = [(BASE,), (TILE,) if self.keep_newlines else (TILE, NEWLINE)] if self.apart else \
            [(BASE, TILE) if self.keep_newlines else (BASE, TILE, NEWLINE)]
        masks = [torch.isin(parts, torch.tensor(g, device=parts.device)) for g in groups]
        left = sum(m.sum(1) for m in masks)
        for i, mask in enumerate(masks):   # each part's share of what is left; the last part takes the rest
            share = budget if i == len(masks) - 1 else (budget * mask.sum(1) / left.clamp(min=1)).round().long()
            part = dataclasses.replace(ctx, seq=dataclasses.replace(ctx.seq, image=mask), n_keep=share, memo={})
            chosen |= chosen_slots(self.method, part)
            budget, left = budget - share, left - mask.sum(1)
        return chosen
