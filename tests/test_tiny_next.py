"""The anyres task (anyres_shapes.py), a short training run of the tiny LLaVA-NeXT, and the shipped one
(minifastv/data/tiny_next): its answers need the tiles, not only the base image."""

import numpy as np
import pytest
import torch

import anyres_shapes
import minifastv
from anyres_shapes import CANVASES, CELL, QUESTION_TYPES, evaluate, example, majority_baseline, make_batch
from minifastv import anyres
from minifastv.data import TINY_NEXT_MODEL
from minifastv.models.llava_next import LlavaNextConfig
from minifastv.pipeline import Pipeline
from shapes import COLOURS

SHIPPED_MIN_ACCURACY = 0.52  # docs/llava-next.md's table: held-out exact match with FastV off (56% on 200)


def seen(image):
    """{(row, column): colour} of the cells whose centre is coloured, read from the picture's pixels."""
    pixels = np.asarray(image)
    out = {}
    for r in range(image.height // CELL):
        for c in range(image.width // CELL):
            rgb = tuple(int(v) for v in pixels[r * CELL + CELL // 2, c * CELL + CELL // 2])
            out.update(((r, c), name) for name, value in COLOURS.items() if value == rgb)
    return out


def test_the_pictures_are_wide_or_tall_canvases_and_the_answers_are_in_their_pixels():
    cfg = LlavaNextConfig.from_name("tiny-next")
    assert example("heldout", 5) == example("heldout", 5) and example("train", 5) != example("heldout", 5)
    sizes = set()
    for i in range(80):
        ex = example("heldout", i)
        image, (h, w) = ex.image(), (ex.picture.height, ex.picture.width)
        sizes.add((h, w))
        assert image.size == (w, h) and h != w
        assert anyres.best_resolution(h, w, cfg.pinpoints) == (h, w)        # a canvas of its own: no padding
        assert seen(image) == {(it.row, it.col): it.colour for it in ex.picture.items}
        if ex.kind in ("colour", "shape_at"):   # the cell asked about holds the answer
            words = ex.question.rstrip("?").split()
            row, col = (anyres_shapes.NUMBERS.index(words[i + 1]) - 1 for i in (-4, -2))
            it = next(it for it in ex.picture.items if (it.row, it.col) == (row, col))
            assert ex.answer == (it.colour if ex.kind == "colour" else it.shape)
    assert sizes == set(CANVASES)
    assert sorted({example("train", i).kind for i in range(8)}) == sorted(QUESTION_TYPES)


def test_blank_tiles_keep_each_base_image_and_blank_every_tile():
    pipe = Pipeline(train_tiny_model(seed=2), train_tiny_tokenizer())
    full, examples = make_batch(pipe, "heldout", range(6))
    base_only, _ = make_batch(pipe, "heldout", range(6), blank_tiles=True)
    blank, _ = make_batch(pipe, "heldout", range(6), blank_images=True)
    first = 0
    for ex in examples:
        n = anyres.n_tiles(ex.picture.height, ex.picture.width, 32, pipe.model.config.pinpoints)
        assert torch.equal(base_only.pixel_values[first], full.pixel_values[first])          # the base image
        assert not torch.equal(blank.pixel_values[first], full.pixel_values[first])
        tiles = base_only.pixel_values[first + 1:first + 1 + n]
        assert torch.equal(tiles, blank.pixel_values[first + 1:first + 1 + n])               # every tile blank
        first += 1 + n
    assert first == len(full.pixel_values)
    assert torch.equal(base_only.input_ids, full.input_ids) and torch.equal(base_only.image_sizes, full.image_sizes)


def train_tiny_tokenizer():
    import train_tiny

    return train_tiny.build_tokenizer("anyres")


def train_tiny_model(seed):
    import train_tiny

    return train_tiny.build_model(train_tiny_tokenizer(), seed=seed, task="anyres").eval()


def test_a_few_training_steps_reduce_the_loss_and_save_a_loadable_checkpoint(tmp_path):
    import train_tiny

    tok = train_tiny_tokenizer()
    fresh = Pipeline(train_tiny.build_model(tok, seed=0, task="anyres"), tok)
    assert fresh.model.config.family == "llava-next" and train_tiny.task_of(fresh) == "anyres"
    batch = train_tiny.training_batch(fresh, range(10**9, 10**9 + 16))
    assert batch.image_sizes is not None and len(batch.pixel_values) > 16    # each image its base image and tiles
    with torch.no_grad():
        before = train_tiny.batch_loss(fresh, batch).item()
    pipe = train_tiny.train(steps=30, seed=0, batch_size=8, log=lambda _: None, task="anyres")
    with torch.no_grad():
        after = train_tiny.batch_loss(pipe, batch).item()
    assert after < 0.6 * before, (before, after)
    minifastv.save(pipe.model, pipe.tokenizer, tmp_path / "tiny-next")
    loaded = minifastv.load(tmp_path / "tiny-next", dtype=None)
    heldout, _ = make_batch(pipe, "heldout", range(4))
    with torch.no_grad():
        assert torch.equal(loaded(**heldout.model_inputs()), pipe.model(**heldout.model_inputs()))


@pytest.fixture(scope="module")
def shipped():
    return Pipeline.load(TINY_NEXT_MODEL, dtype=None)


def test_the_shipped_model_reaches_its_stated_accuracy_and_needs_the_tiles(shipped):
    """The colour of a small shape needs the tiles: the base image alone answers it at the blank picture's rate.
    (shape_at stays at its prior after 3,000 steps: docs/llava-next.md.)"""
    acc = evaluate(shipped, 200)
    assert acc["all"] >= SHIPPED_MIN_ACCURACY and acc["colour"] >= 0.65, acc
    assert acc["all"] > majority_baseline(200)["all"] + 0.05
    blind = evaluate(shipped, 200, blank_images=True)
    assert blind["all"] < acc["all"] - 0.1 and blind["colour"] < acc["colour"] - 0.3, "the model must need the picture"
    base_only = evaluate(shipped, 200, blank_tiles=True)
    assert base_only["colour"] < acc["colour"] - 0.3, "the base image alone must not answer: the colour needs the tiles"
    cfg = shipped.model.config
    assert (cfg.family, cfg.vision.image_size, cfg.pinpoints) == ("llava-next", 32, LlavaNextConfig.from_name(
        "tiny-next").pinpoints)
