"""CDPruner (Zhang et al., arXiv 2506.10967, "Beyond Attention or Similarity: Maximizing Conditional Diversity for
Token Pruning in MLLMs"), before the decoder: keep the image tokens that are both diverse and relevant to the
instruction, as the MAP set of a determinantal point process (DPP) conditioned on the instruction.

- Similarity S: the cosine similarity of the projected image features (what the decoder reads).
- Relevance r: each patch's CLIP similarity to the instruction through CLIP's text tower (models/clip_text.py:
  the mean cosine over the instruction's 77-token chunks, with the tower's sign: the official code negates it for
  LLaVA's CLIP), min-max normalised over the sample's image tokens as the official code does:
  (r - min + 1e-6) / (max - min).
- Kernel L = diag(r) S diag(r); the kept set is the greedy MAP of det(L_kept), found with incremental Cholesky
  updates (Chen et al., NeurIPS 2018): one row per pick, never a determinant.

Each image keeps its share of the sample's budget (the official code gives every image the same count), chosen
among its own tokens. Options (the defaults are the official code's):
- theta: None, the official code: the kernel weighs by r itself. A value in [0, 1): the paper's form, which the
  official code leaves commented out: r becomes exp(theta / (2 (1 - theta)) r), so theta sets how much relevance
  counts against diversity (theta = 0: diversity alone).
Two guards the official code lacks, where it would divide by zero: all of a sample's relevances equal (they all
become 1), and more picks than the kernel's rank (a pick with no gain left updates nothing: the rest follow the
remaining gains in order).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .before_decoder import BeforeDecoder, image_budgets


def dpp_greedy(kernel: torch.Tensor, k: int) -> list[int]:
    """k indices of a DPP kernel [n, n] picked greedily, each the one that most raises log det of the picked
    set's kernel: its gain is the squared norm left after projecting out the picked set (Cholesky rows)."""
    rows = kernel.new_zeros(k, len(kernel))              # the picked set's Cholesky rows, over every index
    gains = kernel.diagonal().clone()                    # each index's det ratio if picked next
    picks = []
    for i in range(k):
        j = int(gains.argmax())
        picks.append(j)
        if gains[j] > 0:
            rows[i] = (kernel[j] - rows[:i, j] @ rows[:i]) / gains[j].sqrt()
            gains -= rows[i] ** 2
        gains[j] = float("-inf")                         # never picked twice
    return picks


def dpp_kernel(features: torch.Tensor, relevance: torch.Tensor, theta: float | None) -> torch.Tensor:
    """L = diag(r) S diag(r) for projected features [n, C] and normalised relevance r [n]."""
    unit = F.normalize(features.float(), dim=-1)
    r = relevance if theta is None else torch.exp(theta / (2 * (1 - theta)) * relevance)
    return r[:, None] * (unit @ unit.T) * r[None, :]


def normalised(relevance: torch.Tensor) -> torch.Tensor:
    """The official min-max normalisation, (r - min + 1e-6) / (max - min); all ones when every r is equal."""
    span = relevance.max() - relevance.min()
    return (relevance - relevance.min() + 1e-6) / span if span > 0 else torch.ones_like(relevance)


@dataclass(frozen=True)
class CDPruner(BeforeDecoder):
    """Drop the fraction `ratio` of image tokens before the decoder, keeping per image the greedy MAP set of the
    DPP whose kernel weighs the projected features' similarity by their relevance to the instruction."""

    theta: float | None = None
    vision_score = "relevance"

    def __post_init__(self):
        super().__post_init__()
        if self.theta is not None and not (isinstance(self.theta, (int, float)) and 0 <= self.theta < 1):
            raise ValueError(f"CDPruner theta must be None (the official code) or in [0, 1), got {self.theta!r}")

    def select(self, ctx):
        chosen = torch.zeros_like(ctx.image_mask)
        for b in range(len(chosen)):
            every = ctx.image_mask[b].nonzero()[:, 0]
            relevance = torch.zeros(ctx.image_mask.shape[1], device=every.device)
            relevance[every] = normalised(ctx.vision_scores[b, every].float())
            groups = image_budgets(ctx, b) if ctx.n_patches else [(every, int(ctx.n_keep[b]))]
            for slots, k in groups:
                if k:
                    picks = dpp_greedy(dpp_kernel(ctx.hidden[b, slots], relevance[slots], self.theta), k)
                    chosen[b, slots[picks]] = True
        return chosen

