"""Attention-share analysis against transformers' eager attention matrices; the kept-patches picture."""

import pytest
import torch
from conftest import IMAGE_TOKEN, expand_images, hf_llava, random_pixels, random_prompt, to_minifastv
from PIL import Image

from minifastv.analyze import attention_shares, kept_patches_picture


@pytest.fixture(scope="module")
def pair():
    hf = hf_llava(n_kv_heads=2, rms_eps=1e-4, seed=7, text_layers=4)
    return hf, to_minifastv(hf)


@torch.no_grad()
def test_shares_match_transformers_attention(pair):
    hf, ours = pair
    ids = random_prompt(torch.Generator().manual_seed(2), 16, [6])  # 6 system tokens, image, 10 instruction
    px = random_pixels(1)
    shares = attention_shares(ours, torch.tensor([ids]), px)
    expanded = torch.tensor([expand_images(ids, 16)])
    attn = hf(input_ids=expanded, pixel_values=px, output_attentions=True).attentions
    is_image = expanded[0] == IMAGE_TOKEN
    first, last = int(is_image.nonzero()[0]), int(is_image.nonzero()[-1])
    segments = [slice(0, first), slice(first, last + 1), slice(last + 1, None)]
    assert len(shares) == len(attn) == 4
    for layer, row in zip(attn, shares):
        probs = layer[0].mean(0)                                     # T, T, head-averaged
        instruction = probs[last + 1:]
        ref_last = [probs[-1, s].sum().item() for s in segments]
        ref_instr = [instruction[:, s].sum(1).mean().item() for s in segments]
        assert row["last"] == pytest.approx(ref_last, abs=1e-5)
        assert row["instruction"] == pytest.approx(ref_instr, abs=1e-5)
        assert sum(row["last"]) == pytest.approx(1.0, abs=1e-5)


def test_analysis_needs_one_prompt_with_an_image(pair):
    _, ours = pair
    with pytest.raises(ValueError, match="needs an image"):
        attention_shares(ours, torch.tensor([[1, 5, 6]]), None)
    with pytest.raises(ValueError, match="one prompt, got a batch of 2"):
        attention_shares(ours, torch.tensor([[1, IMAGE_TOKEN, 5]] * 2), random_pixels(2))


def test_kept_patches_picture():
    view = Image.new("RGB", (16, 16), (200, 100, 50))
    pic = kept_patches_picture(view, grid=2, kept=[0, 3], scale=4)
    assert pic.size == (64, 64)
    assert pic.getpixel((10, 10)) == (200, 100, 50)   # inside kept patch 0
    assert pic.getpixel((40, 10)) == (60, 30, 15)     # patch 1 dropped: dimmed to 30%
    assert pic.getpixel((0, 0)) == (255, 200, 0)      # kept patches are outlined
