"""LLaVA-1.5 image preprocessing: PIL image -> normalised [3, S, S] float tensor.

"pad" (LLaVA-1.5's image_aspect_ratio="pad"): centre the image on a square canvas of the mean colour, then
bicubic-resize to S x S, so nothing is cut off. "crop" (llava-hf's processor): resize the shortest edge to
S, then take the centre S x S.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from .config import CLIP_MEAN, CLIP_STD


def load_image(path: str | Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def resize_shortest_edge(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    short, long = min(w, h), max(w, h)
    new_long = int(size * long / short)  # truncation, as CLIP's processor does
    new_size = (size, new_long) if w <= h else (new_long, size)
    return image.resize(new_size, Image.Resampling.BICUBIC)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


def preprocess(image: Image.Image, size: int, mode: str = "pad",
               mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    image = image.convert("RGB")
    if mode == "pad":
        # The fill is the mean colour x 255, truncated, as LLaVA computes it.
        image = pad_to_square(image, tuple(int(m * 255) for m in mean)).resize((size, size), Image.Resampling.BICUBIC)
    elif mode == "crop":
        image = center_crop(resize_shortest_edge(image, size), size)
    else:
        raise ValueError(f"image mode must be 'pad' or 'crop', got {mode!r}")
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3)
    x = (pixels.permute(2, 0, 1).double() * (1 / 255)).float()       # rescale in fp64, as CLIP's processor
    mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (x - mean) / std
