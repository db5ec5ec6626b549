"""PyramidDrop (Xing et al., arXiv 2410.17247, "PyramidDrop: Accelerating Your Large Vision-Language Models
via Pyramid Visual Redundancy Reduction"): the decoder in four stages; at the end of each of the first
three, keep the fraction lambda of the image tokens still present, ranked by the attention of the last
prompt token (head mean) at the stage's last layer. Image tokens thin out as the layers deepen.

`pyramiddrop-official` (PyramidDropOfficial) follows the official code's conventions instead: it ranks with the
next layer's own query and key projections (the first layer of the new stage, on its input), keeps
floor(n * lambda^s) of the n image tokens the sample started with at stage s, and renumbers positions
after each drop, so the kept tokens sit at consecutive positions (and generated tokens after them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .base import Pruner, Stage
from .checks import check_ratio


@dataclass(frozen=True)
class PyramidDrop(Pruner):
    """Drop the fraction `ratio` (1 - lambda; the paper's lambda is 0.5) of the image tokens still present
    before layers n/4, n/2 and 3n/4 of an n-layer decoder (a decoder of fewer than 4 layers is not pruned)."""

    ratio: float = 0.5
    needs_attention = True

    def __post_init__(self):
        check_ratio(self, self.ratio)

    @classmethod
    def keeping(cls, kept, **settings):
        """Three stages of lambda = kept^(1/3) each leave `kept` after the last."""
        return cls(ratio=1 - kept ** (1 / 3), **settings)

    def stages(self, n_layers):
        return [Stage(q * n_layers // 4, 1 - self.ratio, q - 1) for q in (1, 2, 3)] if n_layers >= 4 else []

    def select(self, ctx):
        return ctx.attention()


@dataclass(frozen=True)
class PyramidDropOfficial(PyramidDrop):
    """PyramidDrop with the official code's conventions (module docstring): the same knobs as PyramidDrop."""

    needs_attention = False
    renumber = True

    def count(self, stage, n_image, n_first):
        # floor, as the official int(); 1e-9 absorbs the float error of 1 - ratio (1 - 0.7 = 0.30000000000000004)
        return min(n_image, math.floor(n_first * stage.keep ** (stage.index + 1) + 1e-9))

    def select(self, ctx):
        return ctx.attention_here()
