"""A synthetic visual question-answering task that the tiny model learns on a CPU in minutes.

Each image is a 4x4 grid of cells holding 1-5 coloured shapes in distinct cells; with the tiny model's
64-pixel images and 8-pixel patches a cell is 2x2 patches. Every question needs specific image regions:
the colour of the shape in a given cell, which shape is in a cell, how many shapes are in a row, whether a
cell holds a shape. Answers are one word. Everything is generated from a seed: example i of a
split is the same on every machine, and the training and held-out splits use disjoint seed streams.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

GRID = 4
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle", "triangle")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")
QUESTION_TYPES = ("colour", "shape_at", "count", "exists")
BACKGROUND = (245, 245, 245)
SPLIT_SEEDS = {"train": 0, "heldout": 1}


@dataclass(frozen=True)
class Item:
    shape: str
    colour: str
    row: int
    col: int


@dataclass(frozen=True)
class Example:
    items: tuple[Item, ...]
    question: str
    answer: str
    kind: str

    def image(self, size: int = 64) -> Image.Image:
        return draw(self.items, size)


def cell_name(it: Item) -> str:
    return f"row {NUMBERS[it.row + 1]} column {NUMBERS[it.col + 1]}"


def draw(items, size: int = 64, *, height: int | None = None, grid: tuple[int, int] = (GRID, GRID)) -> Image.Image:
    """The items on a size x size canvas in a GRID x GRID grid; or on a size wide, `height` high one in a grid of
    (rows, columns) (anyres_shapes.py's pictures); each shape 12% of its cell in from the cell's sides."""
    height = size if height is None else height
    img = Image.new("RGB", (size, height), BACKGROUND)
    pen = ImageDraw.Draw(img)
    cell_h, cell_w = height / grid[0], size / grid[1]
    margin = 0.12
    for it in items:
        x0, y0 = it.col * cell_w + cell_w * margin, it.row * cell_h + cell_h * margin
        x1, y1 = (it.col + 1) * cell_w - cell_w * margin, (it.row + 1) * cell_h - cell_h * margin
        fill = COLOURS[it.colour]
        if it.shape == "square":
            pen.rectangle((x0, y0, x1, y1), fill=fill)
        elif it.shape == "circle":
            pen.ellipse((x0, y0, x1, y1), fill=fill)
        else:
            pen.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return img


def _rng(split: str, index: int) -> random.Random:
    return random.Random(f"{SPLIT_SEEDS[split]}:{index}")


def sample_items(rng: random.Random) -> tuple[Item, ...]:
    cells = rng.sample(range(GRID * GRID), rng.randint(1, 5))
    return tuple(Item(rng.choice(SHAPES), rng.choice(list(COLOURS)), c // GRID, c % GRID) for c in cells)


def ask(items, kind: str, rng: random.Random) -> tuple[str, str]:
    """A question of `kind` about the items, and its one-word answer."""
    if kind == "colour":
        it = rng.choice(items)
        return f"what colour is the {it.shape} in {cell_name(it)}?", it.colour
    if kind == "shape_at":
        it = rng.choice(items)
        return f"which shape is in {cell_name(it)}?", it.shape
    if kind == "count":  # half the time about a row that holds a shape, so "zero" does not dominate
        row = rng.choice(items).row if rng.random() < 0.5 else rng.randrange(GRID)
        return f"how many shapes are in row {NUMBERS[row + 1]}?", NUMBERS[sum(it.row == row for it in items)]
    # "exists": half the time about a cell that holds a shape
    if rng.random() < 0.5:
        it = rng.choice(items)
        row, col = it.row, it.col
    else:
        row, col = rng.randrange(GRID), rng.randrange(GRID)
    present = any((it.row, it.col) == (row, col) for it in items)
    return f"is there a shape in row {NUMBERS[row + 1]} column {NUMBERS[col + 1]}?", "yes" if present else "no"


def example(split: str, index: int) -> Example:
    """Example `index` of `split` ("train" or "heldout"), deterministic; question types cycle."""
    rng = _rng(split, index)
    items = sample_items(rng)
    kind = QUESTION_TYPES[index % len(QUESTION_TYPES)]
    return Example(items, *ask(items, kind, rng), kind)


def describe(items) -> str:
    """Every shape with its colour and cell, in reading order: "red square row one column two , ..."."""
    ordered = sorted(items, key=lambda it: (it.row, it.col))
    return " , ".join(f"{it.colour} {it.shape} {cell_name(it)}" for it in ordered)


def conversation(split: str, index: int) -> tuple[tuple[Item, ...], list[tuple[str, str]]]:
    """One image, a description of it and questions of every type about it, in random order: a multi-turn
    training dialogue. The description ties words to image regions densely, the way LLaVA's
    detailed-description data does; it is never evaluated."""
    rng = _rng(split, index)
    items = sample_items(rng)
    kinds = rng.sample(QUESTION_TYPES, len(QUESTION_TYPES))
    turns = [ask(items, kind, rng) for kind in kinds]
    turns.insert(rng.randrange(len(turns) + 1), ("describe the image.", describe(items)))
    return items, turns


def corpus() -> list[str]:
    """Every word the task can use, for training the tokenizer."""
    words = [*COLOURS, *SHAPES, *NUMBERS, "row", "column", "yes", "no"]
    questions = [example("train", i).question for i in range(400)]
    return words + questions + ["describe the image.", ","]


def make_batch(pipe, split: str, indices, *, blank_images: bool = False):
    """Single-turn prompts about examples `indices` of `split`: (inputs.Batch, the examples). blank_images
    shows the model an empty canvas instead, to measure what it can answer without looking."""
    from minifastv.inputs import questions

    size = pipe.model.config.vision.image_size
    examples = [example(split, i) for i in indices]
    requests = [([draw((), size) if blank_images else ex.image(size)], ex.question) for ex in examples]
    return questions(pipe.tokenizer, pipe.model.config, requests), examples


def evaluate(pipe, n: int = 400, *, prune=None, split: str = "heldout", batch_size: int = 100,
             blank_images: bool = False, make=None, kinds=QUESTION_TYPES) -> dict[str, float]:
    """Exact-match accuracy of greedy answers on the first n examples of `split`, per question type and "all";
    "flops": the prefill's theoretical FLOPs relative to no pruning, and "kept": the share of image tokens
    present in a decoder layer, each averaged over the prompts (and layers) as the model reported them.
    `make` and `kinds`: another task's make_batch and question types (video_shapes.py's)."""
    import torch

    from minifastv.models.generate import stream

    model, tok = pipe.model, pipe.tokenizer
    eos = model.config.text.eos_token_id
    make = make_batch if make is None else make
    correct = dict.fromkeys(kinds, 0)
    total = dict.fromkeys(kinds, 0)
    flops, kept = [], []
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            batch, examples = make(pipe, split, range(start, min(n, start + batch_size)), blank_images=blank_images)
            run = stream(model, **batch.model_inputs(), max_new_tokens=3, prune=prune, eos_token_id=eos)
            out = torch.stack([tokens for tokens, _ in run], dim=1)
            pre = run.prefill
            flops += [a / b for a, b in zip(pre.flops, pre.flops_unpruned)]
            for tokens, n_prompt, n_image in zip(pre.layer_tokens, pre.n_prompt_tokens(), pre.n_image_tokens()):
                kept.append(float((tokens - (n_prompt - n_image)).float().mean()) / n_image)
            for ex, row in zip(examples, out.tolist()):
                answer = tok.decode(row[:row.index(eos)] if eos in row else row).strip()
                correct[ex.kind] += answer == ex.answer
                total[ex.kind] += 1
    acc = {kind: correct[kind] / total[kind] for kind in kinds if total[kind]}
    acc["all"] = sum(correct.values()) / sum(total.values())
    acc["flops"] = sum(flops) / len(flops)
    acc["kept"] = sum(kept) / len(kept)
    return acc


def majority_baseline(n: int = 400, split: str = "heldout", *, task_example=None,
                      kinds=QUESTION_TYPES) -> dict[str, float]:
    """Accuracy of always giving each question type's most frequent answer: the best a blind guess can do
    without reading more of the question. `task_example` and `kinds`: another task's (video_shapes.py's)."""
    from collections import Counter

    answers = {kind: Counter() for kind in kinds}
    for i in range(n):
        ex = (task_example or example)(split, i)
        answers[ex.kind][ex.answer] += 1
    acc = {kind: c.most_common(1)[0][1] / sum(c.values()) for kind, c in answers.items()}
    acc["all"] = sum(c.most_common(1)[0][1] for c in answers.values()) / n
    return acc


def write_samples(directory, n: int = 4, size: int = 64) -> None:
    """The first n held-out examples (one per question type) as PNG files plus questions.json, for the demo:
    python -c "from shapes import write_samples; write_samples('minifastv/data/samples')"."""
    import json
    from pathlib import Path

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(n):
        ex = example("heldout", i)
        ex.image(size).save(directory / f"heldout_{i}.png")
        entries.append({"image": f"heldout_{i}.png", "question": ex.question, "answer": ex.answer})
    (directory / "questions.json").write_text(json.dumps(entries, indent=2) + "\n")


def write_task_data(path, n: int = 400, size: int = 64, *, task_example=None) -> None:
    """The first n held-out examples as JSON lines for the lmms-eval task minifastv_shapes: id, kind, question,
    answer and the image as base64 PNG (lossless: the model sees the pixels evaluate() draws); `task_example`:
    another task's, whose pictures have their own sizes (anyres_shapes.py's):
    python -c "from shapes import write_task_data; write_task_data('minifastv/eval/tasks/minifastv_shapes/heldout.jsonl')"."""
    import base64
    import io
    import json
    from pathlib import Path

    lines = []
    for i in range(n):
        ex = (task_example or example)("heldout", i)
        png = io.BytesIO()
        (ex.image(size) if task_example is None else ex.image()).save(png, format="PNG")
        lines.append(json.dumps({"id": i, "kind": ex.kind, "question": ex.question, "answer": ex.answer,
                                 "image": base64.b64encode(png.getvalue()).decode()}))
    Path(path).write_text("\n".join(lines) + "\n")
