"""FasterVLM (Zhang et al., arXiv 2412.01818, "[CLS] Attention is All You Need for Training-Free Visual Token
Pruning"): the attention that the vision tower's class token pays to each patch ranks the image tokens;
keep the top ones before the decoder sees any. The paper prunes before the projector; the selection is the
same after it, and the decoder's FLOPs (what minifastv counts) are the same."""

from __future__ import annotations

from dataclasses import dataclass

from .before_decoder import BeforeDecoder


@dataclass(frozen=True)
class FasterVLM(BeforeDecoder):
    """Drop the fraction `ratio` of image tokens before the decoder, keeping those the class token attends to
    most (head mean) in the vision block whose output is the feature layer. One ranking per sample, over all
    its images."""

    vision_score = "cls_attention"

    def select(self, ctx):
        return ctx.vision_scores
