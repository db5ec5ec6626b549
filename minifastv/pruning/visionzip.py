"""VisionZip (Yang et al., arXiv 2412.04467, "VisionZip: Longer is Better but Not Necessary in Vision Language
Models"), before the decoder: most of the budget goes to the dominant tokens, those the vision tower's class
token attends to most at the feature layer (as FasterVLM); the rest to contextual tokens: of the tokens left,
every n-th becomes a target, every other one joins the target it is most similar to, and each target carries
the mean of its group. LLaVA-1.5's settings, 54 + 10 of 64, 108 + 20 of 128 and 162 + 30 of 192, are one
share: 10/64 of the budget is contextual.

Two departures from the official code, both stated in docs/pruning.md: similarity is the cosine of the projected
features (the official code compares the vision tower's keys, which the decoder never sees), and a contextual
token sits at its target patch's slot and rotary position (the official code appends the contextual tokens
after the dominant ones)."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from .before_decoder import MergeBeforeDecoder, image_budgets

CONTEXTUAL_SHARE = 10 / 64


def zip_image(features, cls_attention, k: int) -> list[tuple[int, list[int]]]:
    """One image: features [N, C], class-token attention [N] -> (kept index, the indices it averages) for k
    kept tokens: the dominant ones (each alone), then the contextual targets with their groups."""
    n_context = min(k, round(k * CONTEXTUAL_SHARE))
    dominant = cls_attention.topk(k - n_context).indices.sort().values.tolist()
    taken = set(dominant)
    rest = [i for i in range(len(features)) if i not in taken]
    out = [(i, [i]) for i in dominant]
    if n_context == 0:
        return out
    step = max(1, len(rest) // n_context)
    targets = rest[::step][:n_context]
    taken.update(targets)
    others = [i for i in rest if i not in taken]
    groups = {t: [t] for t in targets}
    if others:
        unit = F.normalize(features.float(), dim=-1)
        nearest = (unit[others] @ unit[targets].T).argmax(-1).tolist()         # each other token's target
        for i, j in zip(others, nearest):
            groups[targets[j]].append(i)
    return out + [(t, groups[t]) for t in targets]


@dataclass(frozen=True)
class VisionZip(MergeBeforeDecoder):
    """Drop the fraction `ratio` of image tokens before the decoder: dominant tokens by class-token attention
    and contextual tokens merged from the rest (a sample's budget shared equally among its images, the first
    ones taking the remainder)."""

    vision_score = "cls_attention"

    def plan(self, ctx):
        out = []
        for b in range(len(ctx.image_mask)):
            mine = []
            for slots, k in image_budgets(ctx, b):
                zipped = zip_image(ctx.hidden[b, slots], ctx.vision_scores[b, slots], k)
                slots = slots.tolist()
                mine += [(slots[i], [slots[g] for g in group]) for i, group in zipped]
            out.append(mine)
        return out
