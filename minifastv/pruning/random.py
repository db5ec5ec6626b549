"""Random dropping: the baseline that shows whether a ranking matters. Keeps a seeded uniform sample of
the image tokens after layer K-1, the same size as FastV's."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import AfterLayer


@dataclass(frozen=True)
class RandomDrop(AfterLayer):
    """Drop the fraction `ratio` of image tokens after layer `k` (0: before the decoder), chosen uniformly at
    random with `seed`. The n-th image token of every sample gets the n-th number of one seeded stream, so
    a sample keeps the same tokens alone and in any batch."""

    seed: int = 0
    first_layer = 0

    def select(self, ctx):
        index = ctx.image_index()
        stream = torch.rand(int(index.max()) + 1, generator=torch.Generator().manual_seed(self.seed))
        return stream.to(index.device)[index.clamp(min=0)]
