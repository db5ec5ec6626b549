"""FastV (Chen et al., arXiv 2403.06764, "An Image is Worth 1/2 Tokens After Layer 2"): after layer K-1,
keep the image tokens that the prompt's last token attends to most (head-mean attention at layer K-1) and
run layers K.. on the shorter sequence. The paper's setting is K=2, R=50%."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Pruner, Stage, check_k, check_ratio


@dataclass(frozen=True)
class FastV(Pruner):
    """Prune after layer `k` (layers 0..k-1 see every token), dropping the fraction `ratio` of image tokens."""

    k: int = 2
    ratio: float = 0.5
    needs_attention = True

    def __post_init__(self):
        check_k(self, self.k, 1, "the ranking uses layer k-1's attention")
        check_ratio(self, self.ratio)

    def stages(self):
        return [Stage(self.k, 1 - self.ratio)]

    def select(self, ctx):
        return ctx.attention
