"""Pool: plain downsampling. Average the projected image features over an even grid of bins of each image's
patch grid, down to the budget, before the decoder: the baseline that "Are We Using the Right Benchmark"
(arXiv 2510.07143) finds ahead of many pruning methods. Each pooled token takes the slot, and so the rotary
position, of the patch at the centre of its bin, so the pooled tokens keep the image's row-major order and
the span of positions its patches had."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .before_decoder import MergeBeforeDecoder, patch_grids


def edges(size: int, n: int, i: int) -> tuple[int, int]:
    """Bin i of n over `size` cells, as adaptive average pooling draws it: [floor(i*size/n), ceil((i+1)*size/n))."""
    return i * size // n, -(-(i + 1) * size // n)


def bins(side: int, k: int) -> list[tuple[int, int, int, int]]:
    """k bins (row start, row end, column start, column end) of a side x side grid, row-major: r bands of rows,
    band j cut into k // r columns (one more in the first k % r bands). r is the divisor of k nearest its
    square root that fits the grid (8 x 16 for 128 of 24 x 24), else as square as k allows."""
    if k <= 0:
        return []
    fits = [d for d in range(1, side + 1) if k % d == 0 and k // d <= side]
    r = min(fits, key=lambda d: (abs(d - math.sqrt(k)), d)) if fits else min(side, max(-(-k // side),
                                                                                        round(math.sqrt(k))))
    out = []
    for j in range(r):
        r0, r1 = edges(side, r, j)
        cols = k // r + (j < k % r)
        out += [(r0, r1, *edges(side, cols, i)) for i in range(cols)]
    return out


@dataclass(frozen=True)
class Pool(MergeBeforeDecoder):
    """Keep the fraction 1 - `ratio` of image tokens before the decoder as averages of even bins of each
    image's patches (a sample's budget shared equally among its images, the first ones taking the remainder);
    each average sits at its bin's centre patch. A video is divided per frame, each frame's share going to its
    class token (kept as it is) first, then to the bins of its patch grid."""

    def plan(self, ctx):
        out = []
        for b in range(len(ctx.image_mask)):
            mine = []
            for lead, image, side, k in patch_grids(ctx, b):
                mine += [(slot, [slot]) for slot in lead]
                for r0, r1, c0, c1 in bins(side, k):
                    centre = image[(r0 + r1 - 1) // 2 * side + (c0 + c1 - 1) // 2]
                    mine.append((centre, [image[r * side + c] for r in range(r0, r1) for c in range(c0, c1)]))
            out.append(mine)
        return out
