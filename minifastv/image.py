"""LLaVA-1.5 image preprocessing: PIL image -> normalised [3, S, S] float tensor.

"pad" (LLaVA-1.5's image_aspect_ratio="pad"): centre the image on a square canvas of the mean colour, then
bicubic-resize to S x S, so nothing is cut off. "crop" (llava-hf's processor): resize the shortest edge to
S, then take the centre S x S. "squash" (Qwen-VL's): a plain bicubic resize to S x S, the aspect ratio given up.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from .config import CLIP_MEAN, CLIP_STD

MAX_PADDED_SIDE = 16384  # pad mode builds a max(w, h)-sided square: 0.8 GB of RGB at this side


class ImageError(ValueError):
    """An image that cannot be used: not an image, truncated, an unsupported pixel format, or too large."""


def load_image(path: str | Path) -> Image.Image:
    """Decode an image file fully and return it as 8-bit RGB; errors name the file."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: a directory; pass an image file (one --image per image)")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            im.load()  # decode now, so a truncated file fails here and not inside preprocessing
            return to_rgb(im)
    except Image.DecompressionBombError as e:
        raise ImageError(f"{path}: {e}") from None
    except ImageError as e:
        raise ImageError(f"{path}: {e}") from None
    except PermissionError:
        raise PermissionError(f"{path}: permission denied") from None
    except (OSError, SyntaxError, ValueError) as e:  # PIL's "cannot identify image file", "truncated", ...
        raise ImageError(f"{path}: not a readable image ({e})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB. 16-bit grayscale is scaled down (65535 -> 255), not clipped; alpha is dropped, as LLaVA's
    `convert("RGB")` does; floating-point images are refused, their range is unknown."""
    if image.mode.startswith("I"):  # "I;16", "I;16B", "I" (how PIL opens 16-bit grayscale PNG and TIFF)
        low, high = image.getextrema()
        if low < 0 or high > 65535:
            raise ImageError(f"integer image with values in [{low}, {high}], outside the 16-bit range")
        image = image.convert("I").point(lambda v: v * (1 / 257)).convert("L")
    elif image.mode == "F":
        raise ImageError("floating-point images are not supported; save it as 8- or 16-bit")
    return image.convert("RGB")


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


def model_view(image: Image.Image, size: int, mode: str = "pad", mean=CLIP_MEAN) -> Image.Image:
    """The size x size RGB picture the vision tower sees, before normalisation."""
    image = to_rgb(image)
    if min(image.size) < 1:
        raise ImageError(f"image has no pixels ({image.size[0]}x{image.size[1]})")
    if mode == "pad":
        if max(image.size) > MAX_PADDED_SIDE:
            raise ImageError(f"image is {image.size[0]}x{image.size[1]}; padding it to a square needs a side of "
                             f"{max(image.size)} pixels, above the {MAX_PADDED_SIDE} limit: crop or resize it first")
        # The fill is the mean colour x 255, truncated, as LLaVA computes it.
        return pad_to_square(image, tuple(int(m * 255) for m in mean)).resize((size, size), Image.Resampling.BICUBIC)
    if mode == "crop":
        return center_crop(resize_shortest_edge(image, size), size)
    if mode == "squash":
        return image.resize((size, size), Image.Resampling.BICUBIC)
    raise ValueError(f"image mode must be 'pad', 'crop' or 'squash', got {mode!r}")


def token_grid(config) -> int:
    """The side of the square grid an image's tokens are drawn on (analyze, the server's reports, the page): its
    patches, or the grid a family's config names when its tokens are not patches (Qwen-VL's resampler queries)."""
    return getattr(config, "token_grid", config.vision.grid)


def tokens_per_image(config) -> int:
    """The decoder tokens one image widens into, where that is one number (not LLaVA-NeXT's, which its size sets:
    there, its base image's): what a per-image budget (lmms-eval's prune_kept, the sweep's --kept) counts in."""
    return token_grid(config) ** 2


def preprocess(image: Image.Image, size: int, mode: str = "pad",
               mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    image = model_view(image, size, mode, mean)
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3)
    x = (pixels.permute(2, 0, 1).double() * (1 / 255)).float()       # rescale in fp64, as CLIP's processor
    mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (x - mean) / std
