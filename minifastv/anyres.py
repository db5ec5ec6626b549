"""LLaVA-NeXT's "anyres" images: high resolution by tiling, as haotian-liu/LLaVA (mm_utils.py, llava_arch.py)
and transformers' LlavaNext processor and model define it.

An image of H x W pixels picks, among the checkpoint's `pinpoints` (canvas sizes, each a multiple of the tower's
input size S), the one that shows the most of it at the least waste (best_resolution). It is resized into that
canvas keeping its aspect ratio, centred on black, and cut into S x S tiles, row by row; before the tiles comes
the base image, the whole picture squashed to S x S. Each of these goes through the vision tower alone.

The tiles' features are put back together as one grid of feature cells (p x p per tile, p = S / patch size), the
rows or columns that only saw the black border are cut away again ("unpad"), and a learned `image_newline`
vector ends every row of cells. The base image's p x p features come first. A 672 x 672 image on LLaVA-NeXT-7B:
576 + 48 x (48 + 1) = 2,928 tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from einops import rearrange
from PIL import Image

Pinpoints = Sequence[tuple[int, int]]   # canvas sizes (height, width) in pixels


def best_resolution(height: int, width: int, pinpoints: Pinpoints) -> tuple[int, int]:
    """The canvas (height, width) that keeps the most of the image's pixels once it is scaled to fit, and among
    those the one that wastes the least; the first listed wins a tie."""
    best, best_key = None, None
    for H, W in pinpoints:
        scale = min(W / width, H / height)
        shown = min(int(width * scale) * int(height * scale), width * height)   # upscaling adds no detail
        key = (shown, -(H * W - shown))
        if best_key is None or key > best_key:
            best, best_key = (H, W), key
    return best


def fitted_size(height: int, width: int, H: int, W: int) -> tuple[int, int]:
    """The image's (height, width) once scaled to fit an H x W canvas, aspect ratio kept (rounded up)."""
    if W / width < H / height:
        return min(math.ceil(height * W / width), H), W
    return H, min(math.ceil(width * H / height), W)


def tiles(image: Image.Image, size: int, pinpoints: Pinpoints) -> list[Image.Image]:
    """The base image (the whole image squashed to size x size), then the size x size tiles of the best canvas,
    row-major: what the vision tower sees of one anyres image. `image` is RGB."""
    W0, H0 = image.size
    H, W = best_resolution(H0, W0, pinpoints)
    h, w = fitted_size(H0, W0, H, W)
    canvas = Image.new("RGB", (W, H), (0, 0, 0))
    canvas.paste(image.resize((w, h), Image.Resampling.BICUBIC), ((W - w) // 2, (H - h) // 2))
    base = image.resize((size, size), Image.Resampling.BICUBIC)
    return [base] + [canvas.crop((x, y, x + size, y + size)) for y in range(0, H, size) for x in range(0, W, size)]


def n_tiles(height: int, width: int, size: int, pinpoints: Pinpoints) -> int:
    """Tiles of an image of height x width pixels, the base image not counted."""
    H, W = best_resolution(height, width, pinpoints)
    return (H // size) * (W // size)


def unpadded_cells(height: int, width: int, rows: int, cols: int) -> tuple[int, int, int, int]:
    """(top, left, rows, cols): the part of a rows x cols grid of feature cells that shows the image of
    height x width pixels, the border the canvas added cut away (an equal number of cells off each side). The
    scaled side is rounded to 7 decimals first, as transformers does (110 x 176: 29.999999999999996 cells); the
    original LLaVA-NeXT code truncates instead, so for a few sizes its border is a cell wider or narrower."""
    if width / height > cols / rows:   # wider than the canvas: black bands above and below
        pad = (rows - int(round(height * (cols / width), 7))) // 2
        return pad, 0, rows - 2 * pad, cols
    pad = (cols - int(round(width * (rows / height), 7))) // 2
    return 0, pad, rows, cols - 2 * pad


def grid_shape(height: int, width: int, size: int, patch: int, pinpoints: Pinpoints) -> tuple[int, int, int]:
    """(p, rows, cols): the base image is p x p cells, the unpadded grid of an image of height x width pixels
    rows x cols."""
    p = size // patch
    H, W = best_resolution(height, width, pinpoints)
    _, _, rows, cols = unpadded_cells(height, width, H // size * p, W // size * p)
    return p, rows, cols


def n_tokens(height: int, width: int, size: int, patch: int, pinpoints: Pinpoints) -> int:
    """Decoder tokens of an image of height x width pixels: the base image's cells, then the unpadded grid's
    rows, each followed by a newline token."""
    p, rows, cols = grid_shape(height, width, size, patch, pinpoints)
    return p * p + rows * (cols + 1)


BASE, TILE, NEWLINE = 1, 2, 3   # what an image's decoder token is (parts); 0 where a slot holds no image token


def parts(height: int, width: int, size: int, patch: int, pinpoints: Pinpoints) -> torch.Tensor:
    """[n_tokens]: what each decoder token of an image of height x width pixels is, in pack's order: BASE for
    the base image's cells, then each grid row's TILE cells and its NEWLINE."""
    p, rows, cols = grid_shape(height, width, size, patch, pinpoints)
    row = torch.tensor([TILE] * cols + [NEWLINE])
    return torch.cat([torch.full((p * p,), BASE), row.repeat(rows)])


def pack(features: torch.Tensor, height: int, width: int, size: int, pinpoints: Pinpoints,
         newline: torch.Tensor) -> torch.Tensor:
    """One image's features [1 + n_tiles, p * p, C] (base image first, as tiles() orders them) -> its decoder
    tokens [n_tokens, C]: the base image's cells, then the unpadded grid row by row, each row ended by
    `newline` [C]."""
    p = math.isqrt(features.shape[1])
    H, W = best_resolution(height, width, pinpoints)
    grid = rearrange(features[1:], "(th tw) (ph pw) c -> (th ph) (tw pw) c", th=H // size, tw=W // size, ph=p)
    top, left, rows, cols = unpadded_cells(height, width, *grid.shape[:2])
    grid = grid[top:top + rows, left:left + cols]                                    # rows, cols, C
    grid = torch.cat([grid, newline.to(grid.dtype).expand(rows, 1, -1)], dim=1)      # rows, cols + 1, C
    return torch.cat([features[0], grid.flatten(0, 1)])


def kept_on_grid(labels: list[int], kept) -> dict:
    """One image's kept tokens (indices among its tokens, labelled by `labels` as parts gives them) on its tile
    grid: {"rows", "cols": the unpadded grid's shape, "kept": its kept cells, row-major, "newlines": the rows
    whose newline token was kept}."""
    rows, first = labels.count(NEWLINE), labels.count(BASE)
    cols = labels.count(TILE) // max(rows, 1)
    cells, newlines = [], []
    for t in sorted(kept):
        if t >= first:
            r, c = divmod(t - first, cols + 1)
            newlines.append(r) if c == cols else cells.append(r * cols + c)
    return {"rows": rows, "cols": cols, "kept": cells, "newlines": newlines}


def cell_boxes(height: int, width: int, size: int, patch: int, pinpoints: Pinpoints) -> list[tuple[float, ...]]:
    """Where each cell of the unpadded tile grid lies on the image of height x width pixels itself, row-major:
    (left, top, right, bottom) in its pixels (a cell is patch x patch pixels of the canvas, where the image
    lies scaled and centred)."""
    H, W = best_resolution(height, width, pinpoints)
    h, w = fitted_size(height, width, H, W)
    p = size // patch
    top, left, rows, cols = unpadded_cells(height, width, H // size * p, W // size * p)
    dy, dx = (H - h) // 2, (W - w) // 2

    def x(c):
        return min(max(((left + c) * patch - dx) * width / w, 0), width)

    def y(r):
        return min(max(((top + r) * patch - dy) * height / h, 0), height)

    return [(x(c), y(r), x(c + 1), y(r + 1)) for r in range(rows) for c in range(cols)]
