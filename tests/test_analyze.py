"""Attention-share analysis against transformers' eager attention matrices; the kept-patches picture."""

import pytest
import torch
from helpers import IMAGE_TOKEN, expand_images, random_pixels, random_prompt
from PIL import Image

from minifastv.analyze import attention_shares, kept_patches_picture


@pytest.fixture(scope="module")
def pair(twin):
    return twin(n_kv_heads=2, rms_eps=1e-4, seed=7, text_layers=4)


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


def test_line_plot_draws_one_line_per_series_and_keeps_the_legend_off_them(tmp_path):
    from minifastv.plot import LEGEND_WIDTH, PALETTE, line_plot, x_ticks

    series = {f"s{i}": [(layer, (i + 1) / 8 + layer / 40) for layer in range(4)] for i in range(5)}
    path = line_plot(series, tmp_path / "p.png", xlabel="layer", ylabel="share", ylim=(0.0, 1.0), size=(400, 300))
    with Image.open(path) as im:
        pixels = im.convert("RGB").load()
        width, height = im.size
        plot_colours = {pixels[x, y] for x in range(64, width - LEGEND_WIDTH - 20) for y in range(20, height - 48)}
        legend_colours = {pixels[x, y] for x in range(width - LEGEND_WIDTH, width) for y in range(height)}
    assert width == 400 + LEGEND_WIDTH
    coloured = [c for c in PALETTE if c != (0, 0, 0)]                             # black is also the axes'
    assert [c in plot_colours for c in coloured] == [True] * 5 + [False] * (len(coloured) - 5)  # a line a series
    assert [c in legend_colours for c in coloured] == [True] * 5 + [False] * (len(coloured) - 5)  # legend outside
    assert x_ticks(0, 3, integer=True) == [0.0, 1.0, 2.0, 3.0]                    # layers: whole numbers only
    assert x_ticks(0, 31, integer=True) == [0.0, 4.0, 8.0, 12.0, 16.0, 20.0, 24.0, 28.0]
    assert x_ticks(0.0, 1.0, integer=False) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]


def test_plots_tell_every_method_apart_on_round_ticks():
    """Every series of the methods' comparison (the methods and the unpruned model) has a colour of its own,
    and ticks fall on round values (not 26%, 44%)."""
    from minifastv.plot import MARKERS, PALETTE, nice_ticks
    from minifastv.pruning import METHODS

    assert len(set(PALETTE)) == len(PALETTE) >= len(METHODS) + 1 and len(MARKERS) >= 3
    assert nice_ticks(0.0, 1.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(0.26, 0.94) == [0.4, 0.6, 0.8] and nice_ticks(0, 35) == [0, 10, 20, 30]
    assert nice_ticks(0.5, 1.0) == [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


def test_the_readme_shows_the_code_as_it_stands():
    """The Architecture section's code (the decoder loop, a pruning stage, FastV) is the code: each block appears
    verbatim in the package's source."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    start = readme.index("## Architecture")
    section = readme[start:readme.index("\n## ", start + 5)]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    sources = "\n".join(p.read_text() for p in (root / "minifastv").rglob("*.py"))
    assert len(blocks) == 3 and all(block.rstrip() in sources for block in blocks)
    assert all(len(block.strip().splitlines()) <= 40 for block in blocks)
