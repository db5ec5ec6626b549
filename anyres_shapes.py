"""A synthetic task for the tiny LLaVA-NeXT whose answers need its tiles: small shapes on wide and tall canvases.

Each picture is a wide or tall canvas (32 x 96, 96 x 32, 32 x 64 or 64 x 32 pixels: exactly one of the tiny
LLaVA-NeXT's canvases, so nothing is padded) ruled into 16-pixel cells, with 2-3 shapes in distinct cells, each of
its own kind and its own colour, 12 pixels across. The base image squashes the whole picture into the tower's
32 x 32 input, a third or half as wide (or high) as the picture: a shape becomes a smear of its colour 4-6 pixels
across, and which smear is the triangle is mostly lost. The tiles show each shape at full size. The questions tie a
colour to a shape: the colour of the square, which shape is red, whether there is a red square (when not, mostly a
colour and a shape that are both there, on different shapes). Answers are one word.

The questions name shapes by what they look like, not by where they are: a tile's patches carry their place in the
tile (the tower's position embeddings), but which tile they belong to only the order of the packed sequence says.
On shapes.py's questions about cells the tiny decoder stayed near the answer prior, and on these with shapes 8
pixels across (a quarter of a shape in each patch) at the prior: docs/llava-next.md says what was tried.

Generated from a seed like shapes.py: example i of a split is the same on every machine, and the training and
held-out splits use disjoint seed streams. evaluate(..., blank_tiles=True) shows the model the base image with
every tile blank: what it can answer from the base image alone.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image

import shapes
from shapes import COLOURS, SHAPES, Item, draw

CANVASES = ((32, 96), (96, 32), (32, 64), (64, 32))   # (height, width): wide and tall, each a tiny-next canvas
CELL = 16
QUESTION_TYPES = ("colour", "shape", "exists")
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
        return draw(self.items, self.width, height=self.height, grid=self.grid)


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
    n = rng.randint(2, 3)
    cells, kinds, colours = rng.sample(range(rows * cols), n), rng.sample(SHAPES, n), rng.sample(list(COLOURS), n)
    return Picture(tuple(Item(s, c, cell // cols, cell % cols) for s, c, cell in zip(kinds, colours, cells)),
                   height, width)


def ask(picture: Picture, kind: str, rng: random.Random) -> tuple[str, str]:
    """A question of `kind` about the picture's shapes (each of its own kind and colour), and its one-word answer."""
    it = rng.choice(picture.items)
    if kind == "colour":
        return f"what colour is the {it.shape}?", it.colour
    if kind == "shape":
        return f"which shape is {it.colour}?", it.shape
    # "exists": half the time a pair that is there; else mostly a colour and a shape that are both there but on
    # different shapes (one smear of the right colour is not enough), sometimes a colour that is not there
    if rng.random() < 0.5:
        return f"is there a {it.colour} {it.shape}?", "yes"
    other = rng.choice([o for o in picture.items if o != it])
    absent = [c for c in COLOURS if c not in {o.colour for o in picture.items}]   # 4 colours, at most 3 shapes
    return f"is there a {other.colour if rng.random() < 0.8 else rng.choice(absent)} {it.shape}?", "no"


def example(split: str, index: int) -> AnyresExample:
    """Example `index` of `split` ("train" or "heldout"), deterministic; question types cycle."""
    rng, kind = _rng(split, index), QUESTION_TYPES[index % len(QUESTION_TYPES)]
    picture = sample_picture(rng)
    return AnyresExample(picture, *ask(picture, kind, rng), kind)


def describe(picture: Picture) -> str:
    """Every shape with its colour, in SHAPES's order: "red square , blue triangle"."""
    ordered = sorted(picture.items, key=lambda it: SHAPES.index(it.shape))
    return " , ".join(f"{it.colour} {it.shape}" for it in ordered)


def conversation(split: str, index: int) -> tuple[Picture, list[tuple[str, str]]]:
    """One picture, a description of it and a question of every type about it, in random order."""
    rng = _rng(split, index)
    picture = sample_picture(rng)
    turns = [ask(picture, kind, rng) for kind in rng.sample(QUESTION_TYPES, len(QUESTION_TYPES))]
    turns.insert(rng.randrange(len(turns) + 1), ("describe the image.", describe(picture)))
    return picture, turns


def corpus() -> list[str]:
    """Every word the task can use, for training the tokenizer."""
    words = [*COLOURS, *SHAPES, "yes", "no"]
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
