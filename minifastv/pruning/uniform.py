"""Uniform: keep a spatially even subsample of each image's patch grid, before the decoder. The baseline for
"where" without "which": no scores, just a stride pattern over rows and columns that covers the image."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .before_decoder import BeforeDecoder, patch_grids


def grid_subsample(side: int, k: int) -> list[int]:
    """k row-major indices of a side x side grid, spread evenly: the centres of an r x c grid of cells
    (r * c >= k, as square as k allows), the surplus dropped at an even stride."""
    if k <= 0:
        return []
    rows = min(side, max(1, round(math.sqrt(k))))
    cols = min(side, math.ceil(k / rows))
    rows = math.ceil(k / cols)
    centres = [(int((r + 0.5) * side / rows), int((c + 0.5) * side / cols)) for r in range(rows) for c in range(cols)]
    picked = [centres[i * len(centres) // k] for i in range(k)]
    return sorted(r * side + c for r, c in picked)


@dataclass(frozen=True)
class Uniform(BeforeDecoder):
    """Drop the fraction `ratio` of image tokens before the decoder, keeping an even spread of each image's
    patches; a sample's budget is shared equally among its images (the first ones take the remainder). A video
    is divided per frame, each frame's share going to its class token first, then to its patch grid."""

    def select(self, ctx):
        chosen = torch.zeros_like(ctx.image_mask)
        for b in range(len(chosen)):
            for lead, grid, side, share in patch_grids(ctx, b):
                chosen[b, lead + [grid[i] for i in grid_subsample(side, share)]] = True
        return chosen
