"""DART (Wen et al., arXiv 2502.11494, "Stop Looking for Important Tokens in Multimodal Language Models:
Duplication Matters More"): after layer K-1 (K=2), take as pivots the 8 tokens (4 image, 4 text) whose keys
at the pruning layer have the largest L1 norm; for each pivot, keep an equal share of the budget: the image
tokens least similar (cosine, hidden states) to it, so near-duplicates of a pivot go. Pivots are kept."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import AfterLayer

IMAGE_PIVOTS, TEXT_PIVOTS = 4, 4


def dart_keep(hidden, key_norm, image, text, k: int) -> torch.Tensor:
    """One sample: hidden [S, C], key L1 norms [S], bool image/text slots [S] -> indices of k kept image slots."""
    image_slots, text_slots = image.nonzero()[:, 0], text.nonzero()[:, 0]
    pivots = torch.cat([image_slots[key_norm[image_slots].topk(min(IMAGE_PIVOTS, k, len(image_slots))).indices],
                        text_slots[key_norm[text_slots].topk(min(TEXT_PIVOTS, len(text_slots))).indices]])
    kept = pivots[image[pivots]].tolist()
    taken = set(kept)
    unit = F.normalize(hidden.float(), dim=-1)
    similarity = unit[pivots] @ unit[image_slots].T                            # pivots, image tokens
    left, shares = k - len(kept), len(pivots)
    for p in range(shares):
        share = left // shares + (p < left % shares)
        order = similarity[p].argsort().tolist()                               # least similar first
        new = [s for s in (int(image_slots[i]) for i in order) if s not in taken][:share]
        kept += new
        taken.update(new)
    return torch.tensor(kept, dtype=torch.long)


@dataclass(frozen=True)
class DART(AfterLayer):
    """Prune after layer `k` (the paper's K=2), dropping the fraction `ratio` of image tokens by duplication
    with respect to 8 pivot tokens (4 image, 4 text, largest key L1 norm at layer k)."""

    def select(self, ctx):
        key_norm = ctx.keys().float().abs().sum(-1)                            # B, S
        chosen = torch.zeros_like(ctx.image_mask)
        text = ctx.valid & ~ctx.image_mask
        for b in range(len(chosen)):
            k = int(ctx.n_keep[b])
            if k:
                kept = dart_keep(ctx.hidden[b], key_norm[b], ctx.image_mask[b], text[b], k)
                chosen[b, kept.to(chosen.device)] = True
        return chosen
