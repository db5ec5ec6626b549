"""DivPrune (Alvar et al., arXiv 2503.02175, "DivPrune: Diversity-based Visual Token Pruning for Large
Multimodal Models"): keep the most diverse subset of the projected image features, a max-min diversity
problem with cosine distance solved greedily: first the token whose nearest neighbour is farthest, then
again and again the token farthest from everything picked so far."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .before_decoder import BeforeDecoder


def max_min_order(features: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of k rows of features [n, C] picked greedily for max-min cosine distance (vectorised: one
    [n] update per pick; the n x n distances are computed once)."""
    unit = F.normalize(features.float(), dim=-1)
    distance = 1 - unit @ unit.T                                               # n, n
    nearest = distance.fill_diagonal_(float("inf")).min(1).values
    picks = [int(nearest.argmax())]
    distance.fill_diagonal_(0)
    to_picked = distance[picks[0]].clone()                                     # each token's distance to the set
    for _ in range(k - 1):
        to_picked[picks[-1]] = -1                                              # never pick a token twice
        picks.append(int(to_picked.argmax()))
        to_picked = torch.minimum(to_picked, distance[picks[-1]])
    return torch.tensor(picks[:k], dtype=torch.long)


@dataclass(frozen=True)
class DivPrune(BeforeDecoder):
    """Drop the fraction `ratio` of image tokens before the decoder, keeping a max-min diverse set of the
    projected image features (cosine distance), over all the images of a sample."""

    def select(self, ctx):
        chosen = torch.zeros_like(ctx.image_mask)
        for b in range(len(chosen)):
            slots = ctx.image_mask[b].nonzero()[:, 0]
            k = int(ctx.n_keep[b])
            if k:
                chosen[b, slots[max_min_order(ctx.hidden[b, slots], k).to(slots.device)]] = True
        return chosen
