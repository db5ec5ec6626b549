"""A synthetic task for the tiny LLaVA-NeXT whose answers need its tiles: small shapes on wide and tall canvases.

Each picture is a wide or tall canvas (32 x 96, 96 x 32, 32 x 64 or 64 x 32 pixels: exactly one of the tiny
LLaVA-NeXT's canvases, so nothing is padded) ruled into 16-pixel cells, with 1-5 coloured shapes in distinct cells,
each drawn small (the middle half of its cell). The base image squashes the whole picture into the tower's 32 x 32
input, a third or half as wide (or high) as the picture: a shape becomes a smear a few pixels across. The tiles
show it at full size, 2 x 2 patches a cell. The questions are shapes.py's four kinds on the picture's own grid
(up to 6 rows or columns): the colour or the shape in a cell, how many shapes a row holds, whether a cell holds
one. Answers are one word.

Generated from a seed like shapes.py: example i of a split is the same on every machine, and the training and
held-out splits use disjoint seed streams. evaluate(..., blank_tiles=True) shows the model the base image with
every tile blank: what it can answer from the base image alone.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image

import shapes
from shapes import COLOURS, NUMBERS, SHAPES, Item, cell_name, draw

CANVASES = ((32, 96), (96, 32), (32, 64), (64, 32))   # (height, width): wide and tall, each a tiny-next canvas
CELL = 16
MARGIN = 0.25   # a shape fills the middle half of its cell
QUESTION_TYPES = shapes.QUESTION_TYPES
SPLIT_SEEDS = {"train": 20, "heldout": 21}


@dataclass(frozen=True)
class Picture:
    items: tuple[Item, ...]
    height: int
    width: int

    @property
    def grid(self) -> tuple[int, int]:
        return self.height // CELL, self.width // CELL

    def image(self) -> Image.Image:
        return draw(self.items, self.width, height=self.height, grid=self.grid, margin=MARGIN)


@dataclass(frozen=True)
class AnyresExample:
    picture: Picture
    question: str
    answer: str
    kind: str

    def image(self) -> Image.Image:
        return self.picture.image()


def _rng(split: str, index: int) -> random.Random:
    return random.Random(f"{SPLIT_SEEDS[split]}:{index}")


def sample_picture(rng: random.Random) -> Picture:
    height, width = rng.choice(CANVASES)
    rows, cols = height // CELL, width // CELL
    cells = rng.sample(range(rows * cols), rng.randint(1, 5))
    return Picture(tuple(Item(rng.choice(SHAPES), rng.choice(list(COLOURS)), c // cols, c % cols) for c in cells),
                   height, width)


def ask(picture: Picture, kind: str, rng: random.Random) -> tuple[str, str]:
    """shapes.py's question of `kind` on the picture's own grid, and its one-word answer."""
    return shapes.ask(picture.items, kind, rng, picture.grid)


def example(split: str, index: int) -> AnyresExample:
    """Example `index` of `split` ("train" or "heldout"), deterministic; question types cycle."""
    rng, kind = _rng(split, index), QUESTION_TYPES[index % len(QUESTION_TYPES)]
    picture = sample_picture(rng)
    return AnyresExample(picture, *ask(picture, kind, rng), kind)


def describe(picture: Picture) -> str:
    """Every shape with its colour and cell, in reading order: "red square row one column two , ..."."""
    ordered = sorted(picture.items, key=lambda it: (it.row, it.col))
    return " , ".join(f"{it.colour} {it.shape} {cell_name(it)}" for it in ordered)


def conversation(split: str, index: int) -> tuple[Picture, list[tuple[str, str]]]:
    """One picture, a description of it and a question of every type about it, in random order."""
    rng = _rng(split, index)
    picture = sample_picture(rng)
    turns = [ask(picture, kind, rng) for kind in rng.sample(QUESTION_TYPES, len(QUESTION_TYPES))]
    turns.insert(rng.randrange(len(turns) + 1), ("describe the image.", describe(picture)))
    return picture, turns


def corpus() -> list[str]:
    """Every word the task can use, for training the tokenizer."""
    words = [*COLOURS, *SHAPES, *NUMBERS, "row", "column", "yes", "no"]
    return words + [example("train", i).question for i in range(400)] + ["describe the image.", ","]


def make_batch(pipe, split: str, indices, *, blank_images: bool = False, blank_tiles: bool = False):
    """Single-turn prompts about examples `indices` of `split`: (inputs.Batch, the examples). blank_images shows
    the model empty canvases of the same sizes; blank_tiles keeps each base image and blanks every tile, to measure
    what the model answers from the base image alone."""
    from minifastv import anyres
    from minifastv.image import preprocess
    from minifastv.inputs import questions

    examples = [example(split, i) for i in indices]
    images = [Picture((), ex.picture.height, ex.picture.width).image() if blank_images else ex.image()
              for ex in examples]
    cfg = pipe.model.config
    batch = questions(pipe.tokenizer, cfg, [([im], ex.question) for im, ex in zip(images, examples)])
    if blank_tiles:
        size = cfg.vision.image_size
        blank = preprocess(draw((), size), size, cfg.image_mode, cfg.image_mean, cfg.image_std)
        first = 0
        for im in images:   # each image's base image, then its tiles
            n = anyres.n_tiles(im.height, im.width, size, cfg.pinpoints)
            batch.pixel_values[first + 1:first + 1 + n] = blank
            first += 1 + n
    return batch, examples


def evaluate(pipe, n: int = 400, *, blank_tiles: bool = False, **kwargs) -> dict[str, float]:
    """shapes.evaluate on this task: exact-match accuracy per question type and "all", relative FLOPs, kept share."""
    def make(pipe, split, indices, **options):
        return make_batch(pipe, split, indices, blank_tiles=blank_tiles, **options)

    return shapes.evaluate(pipe, n, make=make, kinds=QUESTION_TYPES, **kwargs)


def majority_baseline(n: int = 400, split: str = "heldout") -> dict[str, float]:
    """Accuracy of always giving each question type's most frequent answer."""
    return shapes.majority_baseline(n, split, task_example=example, kinds=QUESTION_TYPES)


def write_task_data(path, n: int = 400) -> None:
    """The first n held-out examples for the lmms-eval task minifastv_shapes_anyres, as shapes.write_task_data
    writes its own: python -c "from anyres_shapes import write_task_data;
    write_task_data('minifastv/eval/tasks/minifastv_shapes/heldout_anyres.jsonl')"."""
    shapes.write_task_data(path, n, task_example=example)
