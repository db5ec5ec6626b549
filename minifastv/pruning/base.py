"""The pruning seam. A method says WHEN it prunes (a schedule of stages) and WHICH image tokens survive at
each stage (scores for a top-k, or the kept set itself); one rule is applied to whatever it returns (schedule.py,
from the decoder loop in models/llama.py), so every method gets SDPA, original positions, the pruned KV cache,
per-sample selection in left-padded batches and the FLOPs count without knowing about them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .checks import check_choice, check_counts, check_merged, check_ratio, check_stage


@dataclass(frozen=True)
class Stage:
    """Before decoder layer `layer` runs (0: before the decoder), keep round(keep * n) of the n image tokens
    that each sample still has (the method's `count` may say otherwise). `index`: the stage's place in its
    schedule (0 for the first)."""

    layer: int
    keep: float
    index: int = 0


@dataclass
class PruneContext:
    """What a method may look at when it selects, for a batch of B samples over the S current slots. The
    decoder's own parts (its layers, its cache, its final norm) are there for the methods that read them; the
    attention, keys and norms below are computed when a method asks, never on every pass."""

    layer: int                         # the stage's layer: its input is `seq`
    seq: Any                           # the decoder's Sequence entering `layer` (models/llama.py)
    n_keep: torch.Tensor               # [B] image tokens each sample keeps at this stage
    decoder: Any                       # the Llama decoder
    before: Any = None                 # the Sequence that entered layer - 1 (the same slots); None at layer 0
    cache: Any = None                  # the KVCache the pass fills, if any
    memo: dict = field(default_factory=dict)  # what a method's select works out for its merge, at this stage

    # The sequence's fields, by the names methods use:
    hidden = property(lambda self: self.seq.x)                  # [B, S, C] (layer 0: embeddings, image features)
    image_mask = property(lambda self: self.seq.image)          # [B, S] slots that hold image tokens
    valid = property(lambda self: self.seq.valid)               # [B, S] False at padding
    positions = property(lambda self: self.seq.positions)       # [B, S] rotary positions (original, unless renumbered)
    n_patches = property(lambda self: self.seq.n_patches)       # tokens per image (consecutive before the decoder)
    vision_scores = property(lambda self: self.seq.vision_scores)  # [B, S] at image slots, the vision side's
    #   score the method asked for (Pruner.vision_score)
    def attention(self) -> torch.Tensor:
        """[B, S]: FastV's criterion, the head-mean attention of the last prompt slot over every slot at layer - 1.
        One query row against the keys that layer cached in this pass (recomputed without a cache), never an
        S x S matrix."""
        cache = None if self.cache is None else self.cache[self.layer - 1]
        return self.decoder.layers[self.layer - 1].attention_rows(self.before, 1, cache)[:, 0, -self.seq.x.shape[1]:]

    def attention_here(self) -> torch.Tensor:
        """[B, S]: like `attention`, from this layer's own queries and keys on its input."""
        return self.decoder.layers[self.layer].attention_rows(self.seq, 1)[:, 0]

    def keys(self) -> torch.Tensor:
        """[B, S, H_kv * D]: this layer's keys before rotary."""
        block = self.decoder.layers[self.layer]
        return block.attn.k_proj(block.attn_norm(self.hidden))

    def previous_keys(self) -> torch.Tensor:
        """[B, S, H_kv * D]: layer - 1's keys after rotary."""
        return self.decoder.layers[self.layer - 1].keys(self.before)

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The decoder's final RMSNorm applied to `hidden`."""
        return self.decoder.norm(hidden)

    def image_index(self) -> torch.Tensor:
        """[B, S]: the rank of each image slot among its sample's image tokens (0, 1, ...; -1 elsewhere)."""
        return torch.where(self.image_mask, self.image_mask.long().cumsum(1) - 1, -1)


class Pruner:
    """Base class of pruning methods. Subclasses give `stages` and `select`; set `needs_attention` when select
    reads `PruneContext.attention()` (layer - 1's: no stage at layer 0), and `vision_score` to get a score per
    patch in `PruneContext.vision_scores` ("cls_attention" at the feature layer; "relevance": clip_text.py)."""

    needs_attention = False
    vision_score: str | None = None
    renumber = False  # True: after each stage the kept slots take consecutive positions again (0, 1, ...)

    def stages(self, n_layers: int) -> list[Stage]:
        """The stages for a decoder of n_layers layers."""
        raise NotImplementedError

    @classmethod
    def keeping(cls, kept: float, **settings) -> Pruner:
        """The method configured to leave the fraction `kept` of the image tokens after its last stage."""
        return cls(ratio=1 - kept, **settings)

    def count(self, stage: Stage, n_image: int, n_first: int) -> int:
        """Image tokens a sample keeps at `stage`, when it has n_image of them now and had n_first before any
        stage: round(keep * n_image) (Python's round, half to even)."""
        return round(stage.keep * n_image)

    def select(self, ctx: PruneContext) -> torch.Tensor:
        """[B, S] scores (each sample keeps its n_keep best-scored image slots) or a bool [B, S] mask of the
        kept image slots (exactly n_keep per sample)."""
        raise NotImplementedError

    def merge(self, ctx: PruneContext, chosen: torch.Tensor) -> torch.Tensor | None:
        """For methods that merge tokens rather than only drop them: the hidden states [B, S, C] to go on with,
        given the kept image slots `chosen` [B, S] (what a kept slot carries may now stand for dropped ones
        too); None, the default, keeps every hidden state as it is."""
        return None


@dataclass(frozen=True)
class AfterLayer(Pruner):
    """A method that prunes once, before decoder layer `k` (layers 0..k-1 see every token), dropping the
    fraction `ratio` of the image tokens. `first_layer` is the smallest k it accepts."""

    k: int = 2
    ratio: float = 0.5
    first_layer = 1

    def __post_init__(self):
        name = type(self).__name__
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < self.first_layer:
            why = "layer 0 prunes before the decoder" if self.first_layer == 0 else "it prunes after layer k-1"
            raise ValueError(f"{name} k must be an integer >= {self.first_layer} ({why}), got {self.k!r}")
        check_ratio(self, self.ratio)

    def stages(self, n_layers):
        return [Stage(self.k, 1 - self.ratio)]


def active_stages(method: Pruner | None, n_layers: int) -> dict[int, Stage]:
    """The stages that apply to a decoder of n_layers: one at layer >= n_layers would prune after the last
    layer, which changes nothing, so it is dropped (FastV with K >= n_layers is the unpruned model)."""
    if method is None:
        return {}
    stages = {}
    for stage in method.stages(n_layers):
        check_stage(method, stage, stages)
        if stage.layer < n_layers:
            stages[stage.layer] = stage
    return dict(sorted(stages.items()))


def stage_counts(method: Pruner, stage: Stage, n_image: list[int], n_first: list[int]) -> list[int]:
    """method.count for each sample, checked: a sample keeps between 0 and the image tokens it has."""
    counts = [method.count(stage, n, n0) for n, n0 in zip(n_image, n_first)]
    check_counts(method, stage, n_image, counts)
    return counts


def chosen_slots(method: Pruner, ctx: PruneContext) -> torch.Tensor:
    """[B, S] bool: the image slots method.select chose (its mask, or each sample's n_keep best-scored)."""
    choice = method.select(ctx)
    check_choice(method, ctx, choice)
    if choice.dtype == torch.bool:
        return choice
    k_max = int(ctx.n_keep.max())
    top = choice.float().masked_fill(~ctx.image_mask, float("-inf")).topk(k_max, dim=1).indices   # B, k_max
    first = torch.arange(k_max, device=top.device)[None, :] < ctx.n_keep[:, None]
    return torch.zeros_like(ctx.image_mask).scatter(1, top, first)


def keep_slots(method: Pruner, ctx: PruneContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """THE rule: every valid non-image slot survives, and each sample's chosen image slots. Samples may keep
    different counts, so the result is left-padded again: keep [B, L] (slot indices, in slot order) and
    kept_valid [B, L]; and the hidden states [B, S, C] to gather them from (the method's merge, if any)."""
    chosen = chosen_slots(method, ctx)
    hidden = method.merge(ctx, chosen)
    check_merged(method, ctx, hidden)
    hidden = ctx.hidden if hidden is None else hidden
    keep_mask = (ctx.valid & ~ctx.image_mask) | chosen
    # A stable sort of the 0/1 mask puts dropped slots first and kept slots last, both in slot order.
    L = int(keep_mask.sum(1).max())
    keep = torch.sort(keep_mask.to(torch.uint8), dim=1, stable=True).indices[:, -L:]
    return keep, keep_mask.gather(1, keep), hidden
