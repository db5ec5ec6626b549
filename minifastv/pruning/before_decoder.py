"""Methods that prune before the decoder (its layer 0, so every layer runs on fewer tokens): their base class,
each image's share of a sample's budget, and the base class of the methods that merge tokens (each kept slot
carries the mean of a group) rather than only drop them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import Pruner, Stage
from .checks import check_ratio


@dataclass(frozen=True)
class BeforeDecoder(Pruner):
    """A method that prunes once, before the decoder (its layer 0, so every layer runs on fewer tokens),
    dropping the fraction `ratio` of the image tokens."""

    ratio: float = 0.5

    def __post_init__(self):
        check_ratio(self, self.ratio)

    def stages(self, n_layers):
        return [Stage(0, 1 - self.ratio)]


@dataclass(frozen=True)
class MergeBeforeDecoder(BeforeDecoder):
    """A method that keeps some image slots before the decoder, each carrying the mean of a group of image
    slots (itself among them): subclasses give `plan`; selection and merging follow from it."""

    def plan(self, ctx) -> list[list[tuple[int, list[int]]]]:
        """Per sample, (a kept slot, the slots whose mean it carries) for every kept image token."""
        raise NotImplementedError

    def planned(self, ctx):
        """The plan, worked out once per stage: select and merge both read it."""
        if "plan" not in ctx.memo:
            ctx.memo["plan"] = self.plan(ctx)
        return ctx.memo["plan"]

    def select(self, ctx):
        chosen = torch.zeros_like(ctx.image_mask)
        for b, kept in enumerate(self.planned(ctx)):
            chosen[b, [slot for slot, _ in kept]] = True
        return chosen

    def merge(self, ctx, chosen):
        hidden = ctx.hidden.clone()
        for b, kept in enumerate(self.planned(ctx)):
            for slot, group in kept:
                if len(group) > 1:
                    hidden[b, slot] = ctx.hidden[b, group].float().mean(0).to(hidden.dtype)
        return hidden


def image_budgets(ctx, b: int) -> list[tuple[torch.Tensor, int]]:
    """Sample b's images (and video frames: a video model's groups) as (their slots, their share of the
    sample's n_keep): equal shares, the first groups taking the remainder. Before the decoder each group's slots
    are consecutive."""
    if ctx.n_patches is None:
        raise ValueError("the per-image methods (uniform, pool, visionzip) do not divide visual groups of "
                         "different sizes yet (images beside videos, LLaVA-NeXT's images): use fastv, dart, "
                         "divprune, random or pyramiddrop there")
    images = ctx.image_mask[b].nonzero()[:, 0].split(ctx.n_patches)
    budget = int(ctx.n_keep[b])
    return [(slots, budget // len(images) + (j < budget % len(images))) for j, slots in enumerate(images)]


def patch_grids(ctx, b: int) -> list[tuple[list[int], list[int], int, int]]:
    """Sample b's images and video frames for the methods that lay out a patch grid: per group, (slots kept as
    they are: a video frame's class token, which takes the first token of its frame's share; the patch grid's
    slots, row-major; the grid's side; the grid's share)."""
    out = []
    for group, k in image_budgets(ctx, b):
        group = group.tolist()
        side = math.isqrt(len(group))
        lead = group[:len(group) - side * side][:k]   # a frame's class token comes first in the frame
        out.append((lead, group[len(group) - side * side:], side, k - len(lead)))
    return out
