"""Visual-token pruning methods, one per file, on the seam in base.py. A new method is a file here and one
line in METHODS."""

from __future__ import annotations

import dataclasses

from .anyres_parts import AnyresParts
from .base import AfterLayer, PruneContext, Pruner, Stage, active_stages, keep_slots
from .before_decoder import BeforeDecoder
from .cdpruner import CDPruner
from .dart import DART, DARTOfficial
from .divprune import DivPrune
from .fastervlm import FasterVLM
from .fastv import FastV
from .flops import decoder_flops, layer_flops, theoretical_flops
from .pool import Pool
from .pyramiddrop import PyramidDrop, PyramidDropOfficial
from .random import RandomDrop
from .schedule import Schedule
from .uniform import Uniform
from .visionzip import VisionZip

METHODS: dict[str, type[Pruner]] = {"fastv": FastV, "random": RandomDrop, "uniform": Uniform, "fastervlm": FasterVLM,
                                    "divprune": DivPrune, "dart": DART, "pyramiddrop": PyramidDrop, "pool": Pool,
                                    "visionzip": VisionZip, "dart-official": DARTOfficial,
                                    "pyramiddrop-official": PyramidDropOfficial, "cdpruner": CDPruner}


def name_of(method: Pruner) -> str:
    """The METHODS key of a configured method ("fastv" for FastV(2, 0.5))."""
    return next(key for key, cls in METHODS.items() if type(method) is cls)


def settings(name: str, k: int | None, seed: int | None) -> dict:
    """k and seed for the methods that have them; an error for the others (and for an unknown name)."""
    if name not in METHODS:
        raise ValueError(f"unknown pruning method {name!r}; choose from {', '.join(METHODS)}")
    fields = {f.name for f in dataclasses.fields(METHODS[name])}
    out = {}
    for key, value in (("k", k), ("seed", seed)):
        if value is not None:
            if key not in fields:
                raise ValueError(f"pruning method {name!r} takes no {key} (--prune-{key})")
            out[key] = value
    return out


def at_budget(name: str, kept: float, k: int | None = None, seed: int | None = None) -> Pruner:
    """The method called `name` leaving the fraction `kept` of the image tokens after its last stage (for
    comparisons at equal budgets; PyramidDrop prunes three times to get there)."""
    extra = settings(name, k, seed)
    return METHODS[name].keeping(kept, **extra)


def make(name: str, ratio: float, k: int | None = None, seed: int | None = None) -> Pruner:
    """The method called `name` (a key of METHODS) dropping the fraction `ratio` of image tokens; `k` (the
    layer it prunes after) and `seed` go to the methods that have them, and are an error for the others."""
    extra = settings(name, k, seed)
    return METHODS[name](ratio=ratio, **extra)


__all__ = ["AnyresParts", "CDPruner", "DART", "DARTOfficial", "METHODS", "active_stages", "AfterLayer", "at_budget",
           "BeforeDecoder", "decoder_flops", "DivPrune", "FasterVLM", "FastV", "keep_slots", "layer_flops", "make",
           "name_of", "Pool", "PruneContext", "Pruner", "PyramidDrop", "PyramidDropOfficial", "RandomDrop", "Schedule",
           "Stage", "theoretical_flops", "Uniform", "VisionZip"]
