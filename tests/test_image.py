"""Preprocessing against LLaVA's pad path and transformers' CLIP processor (PIL backend)."""

import pytest
import torch
from PIL import Image

from minifastv.config import CLIP_MEAN, CLIP_STD
from minifastv.image import load_image, preprocess


def random_image(w, h, seed=0, mode="RGB"):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8)
    return Image.frombytes("RGB", (w, h), pixels.numpy().tobytes()).convert(mode)


def clip_processor(size):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                 image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))


def llava_expand2square(img, background):
    """LLaVA-1.5's reference: paste the image centred on a square canvas of the background colour."""
    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    result = Image.new(img.mode, (side, side), background)
    result.paste(img, ((side - width) // 2, (side - height) // 2) if width < height else (0, (width - height) // 2))
    return result


@pytest.mark.parametrize("w, h", [(300, 171), (171, 300), (64, 64), (33, 500)], ids=["wide", "tall", "square", "thin"])
@pytest.mark.parametrize("size", [336, 64])
def test_pad_matches_llava(w, h, size):
    img = random_image(w, h, seed=w * h)
    background = tuple(int(x * 255) for x in CLIP_MEAN)
    assert background == (122, 116, 104)
    ref = clip_processor(size)(images=llava_expand2square(img, background), return_tensors="pt")["pixel_values"][0]
    got = preprocess(img, size, mode="pad")
    assert got.shape == (3, size, size) and got.dtype == torch.float32
    assert (got - ref).abs().max() <= 1e-6


@pytest.mark.parametrize("w, h", [(300, 171), (171, 300), (400, 400), (337, 1000), (200, 301), (301, 200), (50, 1001),
                                  (1001, 50)],
                         ids=["wide", "tall", "square", "odd", "tall-rounds-up", "wide-rounds-up", "thin-20x", "flat-20x"])
def test_crop_matches_clip_processor(w, h):
    """Where the long side's 336 * long / short has a fraction of .5 or more (505.68, 6726.72), rounding and
    truncation give different sizes: the processor truncates."""
    img = random_image(w, h, seed=w + h)
    ref = clip_processor(336)(images=img, return_tensors="pt")["pixel_values"][0]
    got = preprocess(img, 336, mode="crop")
    assert (got - ref).abs().max() <= 1e-6


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_non_rgb_images_are_converted(mode, tmp_path):
    img = random_image(50, 30, mode=mode)
    img.save(tmp_path / "x.png")
    loaded = load_image(tmp_path / "x.png")
    assert loaded.mode == "RGB" and loaded.size == (50, 30)
    torch.testing.assert_close(preprocess(loaded, 64), preprocess(img.convert("RGB"), 64))


@pytest.mark.parametrize("w, h", [(300, 171), (171, 600), (1000, 999)], ids=["wide", "tall", "large"])
def test_squash_matches_a_plain_resize_as_qwen_vl_makes_it(w, h):
    """Qwen-VL's transform (torchvision's Resize((448, 448), BICUBIC) on a PIL image, ToTensor, Normalize): PIL's
    bicubic resize of the whole image to a square, which CLIP's PIL processor does with a height and width size
    and no crop."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    img = random_image(w, h, seed=w - h)
    ref = CLIPImageProcessorPil(size={"height": 448, "width": 448}, do_center_crop=False, image_mean=list(CLIP_MEAN),
                                image_std=list(CLIP_STD))(images=img, return_tensors="pt")["pixel_values"][0]
    got = preprocess(img, 448, mode="squash")
    assert got.shape == (3, 448, 448) and (got - ref).abs().max() <= 1e-6


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="image mode must be 'pad', 'crop' or 'squash'"):
        preprocess(random_image(10, 10), 64, mode="stretch")


def test_normalisation_and_pad_colour_are_clips_published_numbers():
    """OpenAI CLIP's published mean and std, and LLaVA's pad colour int(mean * 255) = (122, 116, 104), as
    literal numbers: a thin black image padded to a square shows the colour in its padding, normalised."""
    mean, std, pad = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711), (122, 116, 104)
    x = preprocess(Image.new("RGB", (2, 4), (0, 0, 0)), 4, "pad")          # 4x4 canvas: columns 0 and 3 padding
    for c in range(3):
        assert x[c, 0, 0].item() == pytest.approx((pad[c] / 255 - mean[c]) / std[c], abs=1e-5)
        assert x[c, 0, 1].item() == pytest.approx((0 - mean[c]) / std[c], abs=1e-5)
