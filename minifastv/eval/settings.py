"""What lmms-eval hands the model, as minifastv takes it: a task's generation kwargs, the pruning model args,
the process layout a launcher sets."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..pruning import at_budget, make

DEFAULT_MAX_NEW_TOKENS = 1024  # when a task sets none, as lmms-eval's LLaVA model (capped by the context)
IGNORED_KWARGS = {"image_aspect_ratio", "image_sizes", "use_cache"}  # read from the checkpoint's config instead


class RequestError(ValueError):
    """A request that cannot be run; the run goes on without it."""


@dataclass(frozen=True)
class Sampling:
    """A task's generation kwargs as minifastv takes them."""

    max_new_tokens: int | None
    temperature: float
    top_p: float
    until: tuple[str, ...]

    @classmethod
    def of(cls, gen_kwargs: dict | None) -> Sampling:
        kw = dict(gen_kwargs or {})
        until = kw.pop("until", None) or []
        until = [until] if isinstance(until, str) else until
        if not isinstance(until, (list, tuple)) or not all(isinstance(u, str) for u in until):
            raise ValueError(f"generation kwargs: until must be a string or a list of strings, got {until!r}")
        temperature = float(kw.pop("temperature", 0) or 0)
        do_sample = kw.pop("do_sample", None)
        if do_sample is False:
            temperature = 0.0
        elif do_sample and temperature == 0:
            temperature = 1.0  # sampling asked for without a temperature: transformers' default
        top_p = kw.pop("top_p", None)
        beams = kw.pop("num_beams", 1) or 1
        if int(beams) != 1:
            raise ValueError(f"generation kwargs: num_beams={beams}: minifastv decodes greedily or samples, "
                             "it has no beam search")
        max_new = kw.pop("max_new_tokens", None)
        unknown = set(kw) - IGNORED_KWARGS
        if unknown:
            raise ValueError(f"generation kwargs minifastv does not know: {', '.join(sorted(unknown))}")
        return cls(None if max_new is None else int(max_new), temperature, 1.0 if top_p is None else float(top_p),
                   tuple(u for u in until if u))

    def cut(self, text: str) -> str:
        """The text up to the first stop string."""
        for stop in self.until:
            text = text.split(stop)[0]
        return text


def pruner(name, ratio, kept, k, seed, n_patches: int, *, anyres: str | None = None, sized: bool = False):
    """The pruning method of the model args: prune_ratio drops a fraction; prune_kept keeps that many image
    tokens per image after the method's last stage (PyramidDrop's three stages included), where every image has
    n_patches tokens (not `sized` images: LLaVA-NeXT's count with their size); anyres: the method in one of
    LLaVA-NeXT's treatments of the packed tokens (pruning/anyres_parts.py)."""
    from ..pruning.anyres_parts import TREATMENTS, AnyresParts

    if name in (None, "", "none"):
        if any(v is not None for v in (ratio, kept, k, seed, anyres)):
            raise ValueError("prune_ratio, prune_kept, prune_k, prune_seed and anyres need prune=METHOD")
        return None
    if anyres is not None and anyres not in TREATMENTS:
        raise ValueError(f"anyres={anyres}: not one of {', '.join(TREATMENTS)}")
    if anyres is not None and not sized:
        raise ValueError(f"anyres={anyres}: this model has no tiles (the option treats LLaVA-NeXT's packed tokens)")
    if ratio is not None and kept is not None:
        raise ValueError("give prune_ratio (the fraction dropped) or prune_kept (tokens kept per image), not both")
    if kept is not None:
        if sized:
            raise ValueError(f"prune_kept={kept}: this model's images have as many tokens as their size gives them "
                             "(LLaVA-NeXT: 2,928 at 672 x 672), so a count per image is no one budget; give prune_ratio")
        if not 0 <= kept <= n_patches:
            raise ValueError(f"prune_kept={kept}: an image has {n_patches} tokens")
        method = at_budget(name, kept / n_patches, k, seed)
    else:
        method = make(name, 0.5 if ratio is None else float(ratio), k, seed)
    return method if anyres is None else AnyresParts(method, **TREATMENTS[anyres])


def process_layout() -> tuple[int, int, int, int]:
    """(rank, world size, local rank, processes on this machine) as torchrun and accelerate set them."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", 1))
    return (int(env.get("RANK", 0)), world, int(env.get("LOCAL_RANK", 0)),
            int(env.get("LOCAL_WORLD_SIZE", world)))
