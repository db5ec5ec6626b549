"""LLaVA-NeXT's anyres images against transformers (test-only): the tiles its image processor makes, the
number of tokens its processor reserves for an image, and the model's packing of tile features with newlines."""

import random
import types

import numpy as np
import pytest
import torch
from PIL import Image

from minifastv.anyres import best_resolution, n_tiles, n_tokens, pack, tiles
from minifastv.image import preprocess

transformers = pytest.importorskip("transformers")
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_next.modeling_llava_next import LlavaNextModel
from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

NEXT = (336, 14, ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)))   # llava-v1.6's
TINY = (64, 8, ((64, 128), (128, 64), (128, 128), (192, 64), (64, 192)))
# (width, height): wide, tall, square, smaller than a tile, very wide, a size that rounds in unpadding
SIZES = [(500, 300), (300, 500), (700, 700), (100, 80), (1200, 200), (641, 427)]


def noise(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("size, patch, pinpoints", [NEXT, TINY], ids=["336", "tiny"])
@pytest.mark.parametrize("width, height", SIZES)
def test_tiles_are_the_image_processors(size, patch, pinpoints, width, height):
    image = noise(width, height)
    theirs = LlavaNextImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                        image_grid_pinpoints=[list(p) for p in pinpoints])(image, return_tensors="pt")
    ours = torch.stack([preprocess(t, size, "crop") for t in tiles(image, size, pinpoints)])
    assert theirs["image_sizes"].tolist() == [[height, width]]
    assert ours.shape == theirs["pixel_values"][0].shape and len(ours) == 1 + n_tiles(height, width, size, pinpoints)
    torch.testing.assert_close(ours, theirs["pixel_values"][0], atol=1e-6, rtol=0)


def their_count(height, width, size, patch, pinpoints):
    """The image tokens transformers' LlavaNextProcessor puts in the prompt for one image."""
    processor = types.SimpleNamespace(image_grid_pinpoints=[list(p) for p in pinpoints])
    fake = types.SimpleNamespace(image_processor=processor, patch_size=patch, num_additional_image_tokens=1)
    fake._get_unpadded_features = types.MethodType(LlavaNextProcessor._get_unpadded_features, fake)
    return LlavaNextProcessor._get_number_of_features(fake, height, width, size, size) - 1   # "default": no CLS


def their_pack(features, height, width, size, patch, pinpoints, newline):
    config = types.SimpleNamespace(vision_config=types.SimpleNamespace(image_size=size, patch_size=patch),
                                   image_grid_pinpoints=[list(p) for p in pinpoints])
    packed, _ = LlavaNextModel.pack_image_features(types.SimpleNamespace(config=config), [features],
                                                         torch.tensor([[height, width]]), "default", newline)
    return packed[0]


@pytest.mark.parametrize("size, patch, pinpoints", [NEXT, TINY], ids=["336", "tiny"])
def test_token_counts_and_packing_are_transformers(size, patch, pinpoints):
    rng = random.Random(0)
    sizes = SIZES + [(rng.randint(1, 3000), rng.randint(1, 3000)) for _ in range(60)] + [(1, 2000), (2000, 1)]
    sizes += [(110, 176), (103, 2472), (352, 110), (376, 47)]   # a side just under whole cells: rounding decides
    C, p = 8, size // patch
    for width, height in sizes:
        count = n_tokens(height, width, size, patch, pinpoints)
        assert count == their_count(height, width, size, patch, pinpoints), (width, height)
        features = torch.randn(1 + n_tiles(height, width, size, pinpoints), p * p, C, dtype=torch.float64)
        newline = torch.randn(C, dtype=torch.float64)
        ours = pack(features, height, width, size, pinpoints, newline)
        assert ours.shape == (count, C), (width, height)
        assert torch.equal(ours, their_pack(features, height, width, size, patch, pinpoints, newline)), (width, height)


def test_the_documented_counts():
    """576 + 48 x (48 + 1) = 2,928 tokens for a 672 x 672 image; a wide 2:1 image fills 336 x 672 exactly."""
    size, patch, pinpoints = NEXT
    assert n_tokens(672, 672, size, patch, pinpoints) == 2928
    assert best_resolution(336, 672, pinpoints) == (336, 672) and n_tokens(336, 672, size, patch, pinpoints) == \
        576 + 24 * 49
    # a small image: every canvas shows all of it, so the least waste wins (the first of the smallest listed)
    assert best_resolution(100, 100, pinpoints) == (336, 672) and n_tokens(100, 100, size, patch, pinpoints) == \
        576 + 24 * 25


@pytest.mark.parametrize("width, height", [(500, 300), (300, 500), (100, 80), (1200, 200)])
def test_each_grid_cell_is_drawn_where_the_tiles_show_it(width, height):
    """cell_boxes maps each cell of the unpadded tile grid back onto the image: a white block on black, the share
    of each box the block covers equals the brightness of that cell on the canvas the tiles were cut from."""
    from minifastv.anyres import cell_boxes, grid_shape, unpadded_cells

    size, patch, pinpoints = NEXT
    x0, y0, x1, y1 = width // 5, height // 3, width * 3 // 4, height * 5 // 6
    image = np.zeros((height, width, 3), np.uint8)
    image[y0:y1, x0:x1] = 255
    parts = tiles(Image.fromarray(image), size, pinpoints)[1:]
    H, W = best_resolution(height, width, pinpoints)
    canvas = np.zeros((H, W))
    for i, tile in enumerate(parts):
        r, c = divmod(i, W // size)
        canvas[r * size:(r + 1) * size, c * size:(c + 1) * size] = np.asarray(tile)[..., 0] / 255
    _, rows, cols = grid_shape(height, width, size, patch, pinpoints)
    top, left, _, _ = unpadded_cells(height, width, H // patch, W // patch)
    boxes = cell_boxes(height, width, size, patch, pinpoints)
    assert len(boxes) == rows * cols
    for i, (bx0, by0, bx1, by1) in enumerate(boxes):
        r, c = divmod(i, cols)
        shown = canvas[(top + r) * patch:(top + r + 1) * patch, (left + c) * patch:(left + c + 1) * patch].mean()
        covered = (max(0, min(bx1, x1) - max(bx0, x0)) * max(0, min(by1, y1) - max(by0, y0))
                   / ((bx1 - bx0) * (by1 - by0)))
        assert abs(shown - covered) < 0.1, (i, shown, covered)   # measured: at most 0.033 (bicubic edges)
