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

SHIPPED_MIN_ACCURACY = 0.93  # docs/llava-next.md's table: held-out exact match with FastV off (97% on 200)


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
    sizes, negatives, hard = set(), 0, 0
    for i in range(120):
        ex = example("heldout", i)
        image, (h, w), items = ex.image(), (ex.picture.height, ex.picture.width), ex.picture.items
        sizes.add((h, w))
        assert image.size == (w, h) and h != w
        assert anyres.best_resolution(h, w, cfg.pinpoints) == (h, w)        # a canvas of its own: no padding
        assert seen(image) == {(it.row, it.col): it.colour for it in items}
        assert 2 <= len(items) <= 3
        assert len({it.shape for it in items}) == len({it.colour for it in items}) == len(items)   # each its own
        colour_of = {it.shape: it.colour for it in items}
        words = ex.question.rstrip("?").split()
        if ex.kind == "colour":      # "what colour is the SHAPE?"
            assert ex.answer == colour_of[words[-1]]
        elif ex.kind == "shape":     # "which shape is COLOUR?"
            assert ex.answer == next(s for s, c in colour_of.items() if c == words[-1])
        else:                        # "is there a COLOUR SHAPE?"
            colour, shape = words[-2:]
            assert ex.answer == ("yes" if colour_of.get(shape) == colour else "no")
            negatives += ex.answer == "no"
            hard += ex.answer == "no" and colour in colour_of.values() and shape in colour_of
    assert sizes == set(CANVASES)
    assert negatives >= 10 and hard >= 0.6 * negatives, (negatives, hard)   # the colour is there, on another shape
    assert sorted({example("train", i).kind for i in range(6)}) == sorted(QUESTION_TYPES)
    picture, turns = anyres_shapes.conversation("train", 0)
    assert ("describe the image.", anyres_shapes.describe(picture)) in turns and len(turns) == len(QUESTION_TYPES) + 1


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
    """Which smear is the triangle is lost in the base image: with the tiles blank every kind of question falls
    towards its prior (docs/llava-next.md: 97% -> 48%)."""
    acc = evaluate(shipped, 200)
    assert acc["all"] >= SHIPPED_MIN_ACCURACY and min(acc[k] for k in QUESTION_TYPES) >= 0.85, acc
    assert acc["all"] > majority_baseline(200)["all"] + 0.4
    blind = evaluate(shipped, 200, blank_images=True)
    assert blind["all"] < acc["all"] - 0.4, "the model must need the picture"
    base_only = evaluate(shipped, 200, blank_tiles=True)
    assert all(base_only[k] < acc[k] - 0.25 for k in QUESTION_TYPES), ("the base image alone answers", base_only)
    cfg = shipped.model.config
    assert (cfg.family, cfg.vision.image_size, cfg.pinpoints) == ("llava-next", 32, LlavaNextConfig.from_name(
        "tiny-next").pinpoints)
