"""A pruning method's settings and answers, checked: a method written wrong gets an error that names it and
what it returned, never a silently wrong pass. base.py calls these; the seam reads without them."""

from __future__ import annotations

import torch


def check_ratio(method, ratio):
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise ValueError(f"{type(method).__name__} ratio must be a number in [0, 1) (the fraction of image tokens "
                         f"dropped), got {ratio!r}")


VISION_SCORES = ("cls_attention", "relevance")   # what a method may ask of the vision side (Pruner.vision_score)


def check_stage(method, stage, stages: dict):
    """A stage of `method`, given the stages accepted before it (by layer)."""
    if method.vision_score not in (None, *VISION_SCORES):   # else its scores would silently read as zeros
        raise ValueError(f"{type(method).__name__}.vision_score must be None or one of {', '.join(VISION_SCORES)}, "
                         f"got {method.vision_score!r}")
    if not (stage.layer >= 0 and 0 < stage.keep <= 1):
        raise ValueError(f"{type(method).__name__}: a stage must have layer >= 0 and keep in (0, 1], got {stage}")
    if stage.layer in stages:
        raise ValueError(f"{type(method).__name__}: two stages at layer {stage.layer}")
    if stage.layer == 0 and method.needs_attention:
        raise ValueError(f"{type(method).__name__}: a stage at layer 0 has no earlier layer's attention")


def check_counts(method, stage, n_image: list[int], counts: list[int]):
    """method.count's answers: a sample keeps between 0 and the image tokens it has."""
    for n, c in zip(n_image, counts):
        if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c <= n:
            raise ValueError(f"{type(method).__name__}.count at layer {stage.layer} gave {c!r} for {n} image tokens")


def check_choice(method, ctx, choice: torch.Tensor):
    """method.select's answer: scores over every slot, or a mask of exactly n_keep image slots per sample."""
    name, image_mask = type(method).__name__, ctx.image_mask
    if choice.shape != image_mask.shape:
        raise ValueError(f"{name}.select returned shape {list(choice.shape)}, expected {list(image_mask.shape)}")
    if choice.dtype == torch.bool and ((choice & ~image_mask).any() or not torch.equal(choice.sum(1), ctx.n_keep)):
        raise ValueError(f"{name}.select must mark exactly n_keep image slots per sample: marked "
                         f"{choice.sum(1).tolist()} (of them image slots: {(choice & image_mask).sum(1).tolist()}),"
                         f" n_keep {ctx.n_keep.tolist()}")


def check_merged(method, ctx, hidden: torch.Tensor | None):
    """method.merge's answer: None, or hidden states shaped as the context's."""
    if hidden is not None and hidden.shape != ctx.hidden.shape:
        raise ValueError(f"{type(method).__name__}.merge returned shape {list(hidden.shape)}, "
                         f"expected {list(ctx.hidden.shape)}")
