"""Random dropping: the baseline that shows whether a ranking matters. Keeps a seeded uniform sample of
the image tokens after layer K-1, the same size as FastV's."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Pruner, Stage, check_k, check_ratio


@dataclass(frozen=True)
class RandomDrop(Pruner):
    """Drop the fraction `ratio` of image tokens after layer `k`, chosen uniformly at random with `seed`.

    The n-th image token of every sample gets the n-th number of one seeded stream, so a sample keeps the
    same tokens alone and in any batch."""

    k: int = 2
    ratio: float = 0.5
    seed: int = 0

    def __post_init__(self):
        check_k(self, self.k, 0, "layer 0 prunes before the decoder")
        check_ratio(self, self.ratio)

    def stages(self):
        return [Stage(self.k, 1 - self.ratio)]

    def select(self, ctx):
        index = ctx.image_index()
        stream = torch.rand(int(index.max()) + 1, generator=torch.Generator().manual_seed(self.seed))
        return stream.to(index.device)[index.clamp(min=0)]
