"""LLaVA-NeXT (Liu et al., 2024, llava-v1.6): LLaVA-1.5's glue at high resolution. An image is its base image
and the tiles of the canvas that suits its size (minifastv/anyres.py), each through the same CLIP tower and
projector; the tiles' features are packed into one grid with the canvas border cut away and a learned
`image_newline` vector ending each row, after the base image's features (2,928 tokens for 672 x 672).

An image's token count depends on its size, so the prompt holds, as transformers' processor writes it, one
placeholder per image TOKEN: anyres.n_tokens(...) consecutive image ids per image. Every length check (the
context, the cache, the server's room for an answer) then sees the real length before anything runs, and each
placeholder here widens into one slot. pixel_values holds every image's tiles, its base image first, images in
placeholder order ([n_tiles_total, 3, S, S]); image_sizes [n_images, 2] their sizes (height, width) in pixels.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .. import anyres
from ..config import ConfigError, LlavaConfig
from ..image import ImageError
from ..pruning.anyres_parts import AnyresParts
from ..tokenizer import TEMPLATES
from .clip_text import SCORES
from .llava import LlavaModel, Prefill

PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))   # llava-v1.6's canvases


@dataclass(frozen=True)
class LlavaNextConfig(LlavaConfig):
    """LlavaConfig with the canvases (height, width) an image may be tiled on, each a multiple of the tower's
    input size, and the decoder's conversation template (tokenizer.TEMPLATES: vicuna_v1, mistral_instruct, chatml)
    with its system line (None: vicuna_v1's; "" none)."""

    pinpoints: tuple[tuple[int, int], ...] = PINPOINTS
    template: str = "vicuna_v1"
    system: str | None = None
    family: ClassVar[str] = "llava-next"
    placeholder_per_token: ClassVar[bool] = True   # inputs.check_inputs: placeholders count tokens, not images

    def __post_init__(self):
        super().__post_init__()
        try:
            pinpoints = tuple((int(h), int(w)) for h, w in self.pinpoints)
        except (TypeError, ValueError):
            raise ConfigError(f"pinpoints must be [height, width] pairs, got {self.pinpoints!r:.80}") from None
        size = self.vision.image_size
        bad = [p for p in pinpoints if min(p) <= 0 or p[0] % size or p[1] % size]
        if not pinpoints or bad:
            raise ConfigError(f"pinpoints must be canvases whose sides are positive multiples of the image size "
                              f"{size}, got {bad or 'none'}")
        object.__setattr__(self, "pinpoints", pinpoints)
        if self.template not in TEMPLATES:
            raise ConfigError(f"template {self.template!r:.40} is not one of {', '.join(TEMPLATES)}")
        if self.system is not None and not isinstance(self.system, str):
            raise ConfigError(f"system must be text, got {self.system!r:.40}")

    def tiles(self, image):
        """What the vision tower sees of an RGB PIL image: its base image, then its tiles."""
        if min(image.size) < 1:
            raise ImageError(f"image has no pixels ({image.size[0]}x{image.size[1]})")
        return anyres.tiles(image, self.vision.image_size, self.pinpoints)

    def n_image_tokens(self, height: int, width: int) -> int:
        """Decoder tokens (and prompt placeholders) of an image of height x width pixels."""
        return anyres.n_tokens(height, width, self.vision.image_size, self.vision.patch_size, self.pinpoints)


_TINY = LlavaConfig.from_name("tiny")
NEXT_PRESETS = {
    # The tiny model's tower on 32 px tiles (4 x 4 patches) and its decoder, with llava-v1.6's canvases scaled
    # from 336 to 32 px (train_tiny.py --anyres: 52-76 image tokens for anyres_shapes.py's pictures).
    "tiny-next": LlavaNextConfig(vision=dataclasses.replace(_TINY.vision, image_size=32), text=_TINY.text,
                                 image_token_id=3, pinpoints=tuple((h * 32 // 336, w * 32 // 336)
                                                                   for h, w in PINPOINTS)),
}
LlavaNextConfig.presets = NEXT_PRESETS


def checked_sizes(image_sizes) -> list[tuple[int, int]]:
    """image_sizes [n_images, 2] as (height, width) pairs; a one-line error if they are not positive pairs."""
    given = torch.as_tensor(image_sizes)
    if given.dim() != 2 or given.shape[1] != 2 or (given < 1).any():
        raise ValueError(f"image_sizes must be [height, width] pairs of positive sizes, got {given.tolist()[:4]}")
    return [tuple(s) for s in given.tolist()]


@dataclass
class NextPrefill(Prefill):
    """A Prefill that also says what each merged slot holds (anyres.BASE, TILE, NEWLINE; 0 elsewhere): [B, T]."""

    parts: torch.Tensor | None = None


class LlavaNextModel(LlavaModel):
    def __init__(self, config: LlavaNextConfig):
        super().__init__(config)
        self.image_newline = nn.Parameter(torch.zeros(config.text.dim))

    def spans(self) -> dict[int, int]:
        return {self.config.image_token_id: 1}   # one placeholder per image token

    def groups(self) -> dict[int, int]:
        return {}   # images of different sizes: the per-image methods do not divide them yet

    def encode_anyres(self, pixel_values: torch.Tensor, image_sizes) -> list[torch.Tensor]:
        """Every image's tiles [n_tiles_total, 3, S, S] (base image first) and sizes [n_images, 2] -> per image,
        its decoder tokens [n_tokens, text dim]."""
        cfg, size, sizes = self.config, self.config.vision.image_size, checked_sizes(image_sizes)
        counts = [1 + anyres.n_tiles(h, w, size, cfg.pinpoints) for h, w in sizes]
        if sum(counts) != len(pixel_values):
            raise ValueError(f"pixel_values has {len(pixel_values)} tiles, but image_sizes {sizes[:4]} need "
                             f"{sum(counts)} (each image its base image and tiles: {counts[:4]})")
        features = self.encode_images(pixel_values).split(counts)
        return [anyres.pack(f, h, w, size, cfg.pinpoints, self.image_newline) for f, (h, w) in zip(features, sizes)]

    def parts(self, input_ids: torch.Tensor, image_sizes) -> torch.Tensor | None:
        """[B, T_out] what each merged slot holds (anyres.BASE, TILE, NEWLINE; 0 text or padding), for the
        pruning options that treat the parts apart; None when the placeholders do not match the images (the
        pass itself then says how). Malformed image_sizes are refused here."""
        cfg, here = self.config, input_ids == self.config.image_token_id
        labels = [anyres.parts(h, w, cfg.vision.image_size, cfg.vision.patch_size, cfg.pinpoints)
                  for h, w in checked_sizes(image_sizes)]
        if sum(map(len, labels)) != int(here.sum()):
            return None
        start, T_out = self.merged_slots(input_ids)
        out = torch.zeros(len(input_ids), T_out, dtype=torch.long, device=input_ids.device)
        rows = torch.arange(len(input_ids), device=input_ids.device)[:, None].expand_as(input_ids)
        out[rows[here], start[here]] = torch.cat(labels).to(out.device)   # placeholders in order, one slot each
        return out

    def prefill(self, input_ids, pixel_values=None, *, prune=None, image_sizes=None, **kwargs) -> NextPrefill:
        parts = None if image_sizes is None else self.parts(input_ids.to(self.device), image_sizes)
        if isinstance(prune, AnyresParts) and parts is not None:   # the option learns where the parts lie
            prune = prune.bound(parts)
        pre = super().prefill(input_ids, pixel_values, prune=prune, image_sizes=image_sizes, **kwargs)
        return NextPrefill(**vars(pre), parts=parts)

    def visual_features(self, input_ids, pixel_values, score: str | None, image_sizes=None, **visual):
        super().visual_features(input_ids, None, None, **visual)   # refuses the inputs this model does not take
        if pixel_values is None or image_sizes is None:
            if pixel_values is not None or image_sizes is not None or (input_ids == self.config.image_token_id).any():
                raise ValueError("LLaVA-NeXT takes an image as its tiles in pixel_values with its size in image_sizes "
                                 "and one prompt placeholder per image token (minifastv.inputs.questions prepares "
                                 "them, as Pipeline.inputs does)")
            return []
        if score:
            raise ValueError(f"the methods that rank by the vision tower's {SCORES[score]} do not take LLaVA-NeXT's "
                             "tiles yet")
        packed = self.encode_anyres(pixel_values, image_sizes)
        here = input_ids == self.config.image_token_id
        flat = torch.cat([here, here.new_zeros(len(here), 1)], 1).flatten().int()   # a gap after each row
        edges = flat.diff(prepend=flat.new_zeros(1))
        lengths = ((edges == -1).nonzero() - (edges == 1).nonzero())[:, 0].tolist()   # each run of placeholders
        if lengths != [len(p) for p in packed]:
            raise ValueError(f"the prompt's image placeholders come in runs of {lengths[:4]}, but the images need "
                             f"{[len(p) for p in packed][:4]} (one placeholder per image token, as "
                             "LlavaNextConfig.n_image_tokens counts them)")
        return [(self.config.image_token_id, torch.cat(packed)[:, None], None)]
