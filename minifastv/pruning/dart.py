"""DART (Wen et al., arXiv 2502.11494, "Stop Looking for Important Tokens in Multimodal Language Models:
Duplication Matters More"): after layer K-1 (K=2), take as pivots the 8 tokens (4 image, 4 text) whose keys
at the pruning layer have the largest L1 norm; for each pivot, keep an equal share of the budget: the image
tokens least similar (cosine, hidden states) to it, so near-duplicates of a pivot go. Pivots are kept.

`dart-official` (DARTOfficial) follows the official code's conventions instead: text pivots only from the
tokens after the (last) image; key norms of layer K-1's keys after rotary; similarity of the hidden states
after the decoder's final norm; each of the 8 pivots takes floor(budget / 8) tokens and the image pivots
come on top (a budget of 128 keeps 132); pivots take their shares in the order the official code visits them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import AfterLayer

IMAGE_PIVOTS, TEXT_PIVOTS = 4, 4


def dart_keep(hidden, key_norm, image, text, k: int, order=None) -> torch.Tensor:
    """One sample: hidden [S, C], key L1 norms [S], bool image/text slots [S] -> indices of k kept image slots.
    `order` (pivots -> their order) sets the order in which pivots take their shares (default: image pivots
    first, each group by key norm)."""
    image_slots, text_slots = image.nonzero()[:, 0], text.nonzero()[:, 0]
    pivots = torch.cat([image_slots[key_norm[image_slots].topk(min(IMAGE_PIVOTS, k, len(image_slots))).indices],
                        text_slots[key_norm[text_slots].topk(min(TEXT_PIVOTS, len(text_slots))).indices]])
    kept = pivots[image[pivots]].tolist()
    taken = set(kept)
    if order is not None:
        pivots = order(pivots)
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


def set_order(positions):
    """The official code visits its pivots as a Python set of their sequence indices (the positions, in a
    prompt of its own); iterating the same set of positions gives the same order, and the same tokens."""
    def order(pivots):
        at = {int(positions[p]): p for p in pivots.tolist()}
        return torch.tensor([at[q] for q in set(at)], device=pivots.device)
    return order


@dataclass(frozen=True)
class DARTOfficial(DART):
    """DART with the official code's conventions (module docstring): the same knobs as DART."""

    def count(self, stage, n_image, n_first):
        n_pivots = IMAGE_PIVOTS + TEXT_PIVOTS
        per_pivot = super().count(stage, n_image, n_first) // n_pivots
        return min(n_image, min(IMAGE_PIVOTS, n_image) + n_pivots * per_pivot)

    def select(self, ctx):
        key_norm = ctx.previous_keys().float().abs().sum(-1)                   # B, S
        hidden = ctx.final_norm(ctx.hidden)
        chosen = torch.zeros_like(ctx.image_mask)
        slot = torch.arange(ctx.image_mask.shape[1], device=ctx.image_mask.device)
        for b in range(len(chosen)):
            k = int(ctx.n_keep[b])
            if k:
                text = ctx.valid[b] & ~ctx.image_mask[b] & (slot > slot[ctx.image_mask[b]].max())
                kept = dart_keep(hidden[b], key_norm[b], ctx.image_mask[b], text, k, set_order(ctx.positions[b]))
                chosen[b, kept.to(chosen.device)] = True
        return chosen
