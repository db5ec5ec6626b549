"""FastV (Chen et al., arXiv 2403.06764, "An Image is Worth 1/2 Tokens After Layer 2"): after layer K-1,
keep the image tokens that the prompt's last token attends to most (head-mean attention at layer K-1) and
run layers K.. on the shorter sequence. The paper's setting is K=2, R=50%."""

from __future__ import annotations

from dataclasses import dataclass

from .base import AfterLayer


@dataclass(frozen=True)
class FastV(AfterLayer):
    """Prune after layer `k`, keeping the image tokens the last prompt token attends to most at layer k-1 and
    dropping the fraction `ratio` of them."""

    needs_attention = True

    def select(self, ctx):
        return ctx.attention()
