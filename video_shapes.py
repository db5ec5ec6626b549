"""A synthetic video question-answering task that the tiny video model learns on a CPU in minutes.

Each video is 8 frames of 32 x 32 pixels: a 4x4 grid of cells (one 8-pixel patch each at the tiny video model's
patch size) that 1-3 shapes cross, one cell per frame. Every shape has its own kind and colour, enters at its own
frame on one edge, crosses the grid in 4 frames and leaves; two shapes never share a cell in a frame. The questions
need the order of the frames, or more than one frame:
- direction: "which way does the red square move?" (left, right, up, down: the frames reversed give the opposite)
- first: "which colour appears first?"
- toward: "does the circle move toward the square?" (yes when their distance shrinks over the frames that show
  both; the frames reversed give the opposite)
- count: "how many shapes appear?" (shapes come and go: one frame may not show them all)

Everything is generated from a seed, like shapes.py: example i of a split is the same on every machine, and the
training and held-out splits use disjoint seed streams. The frames are drawn with shapes.py's draw().
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image

import shapes
from shapes import COLOURS, GRID, NUMBERS, SHAPES, Item, cell_name, draw

FRAMES = 8
SIZE = 32
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
QUESTION_TYPES = ("direction", "first", "toward", "count")
SPLIT_SEEDS = {"train": 10, "heldout": 11}


@dataclass(frozen=True)
class Track:
    """A shape crossing the grid: in `start` at frame `appear`, one cell further in `direction` each frame, on
    screen for `length` frames."""

    shape: str
    colour: str
    start: tuple[int, int]
    direction: str
    appear: int
    length: int

    def at(self, t: int) -> Item | None:
        """Where the shape is in frame t (None when it is off screen)."""
        if not self.appear <= t < self.appear + self.length:
            return None
        dr, dc = DIRECTIONS[self.direction]
        step = t - self.appear
        return Item(self.shape, self.colour, self.start[0] + dr * step, self.start[1] + dc * step)

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class VideoExample:
    tracks: tuple[Track, ...]
    question: str
    answer: str
    kind: str

    def frames(self, size: int = SIZE) -> list[Image.Image]:
        return video_frames(self.tracks, size)


def video_frames(tracks, size: int = SIZE) -> list[Image.Image]:
    return [draw([it for it in (tr.at(t) for tr in tracks) if it is not None], size) for t in range(FRAMES)]


def _rng(split: str, index: int) -> random.Random:
    return random.Random(f"{SPLIT_SEEDS[split]}:{index}")


def sample_track(rng: random.Random, shape: str, colour: str, appear: int) -> Track:
    """A shape that enters at frame `appear` on one edge and crosses the grid to the opposite edge."""
    length = GRID
    direction = rng.choice(list(DIRECTIONS))
    dr, dc = DIRECTIONS[direction]
    along = 0                                                # the first cell along the motion, counted forward
    across = rng.randrange(GRID)
    if dr:
        start = (along if dr > 0 else GRID - 1 - along, across)
    else:
        start = (across, along if dc > 0 else GRID - 1 - along)
    return Track(shape, colour, start, direction, appear, length)


def collide(tracks) -> bool:
    for t in range(FRAMES):
        cells = [(it.row, it.col) for it in (tr.at(t) for tr in tracks) if it is not None]
        if len(cells) != len(set(cells)):
            return True
    return False


def sample_tracks(rng: random.Random, n_min: int = 1) -> tuple[Track, ...]:
    """1-3 shapes of distinct kinds, colours and entry frames (0-4), never in one cell at once."""
    while True:
        n = rng.randint(n_min, 3)
        kinds, colours = rng.sample(SHAPES, n), rng.sample(list(COLOURS), n)
        appears = sorted(rng.sample(range(5), n))
        tracks = tuple(sample_track(rng, s, c, a) for s, c, a in zip(kinds, colours, appears))
        if not collide(tracks):
            return tracks


def closing(a: Track, b: Track) -> bool | None:
    """Whether a and b get closer over the frames that show both (None: fewer than two such frames, or no
    change in their distance)."""
    both = [t for t in range(FRAMES) if a.at(t) is not None and b.at(t) is not None]
    if len(both) < 2:
        return None

    def distance(t):
        p, q = a.at(t), b.at(t)
        return (p.row - q.row) ** 2 + (p.col - q.col) ** 2

    first, last = distance(both[0]), distance(both[-1])
    return None if first == last else last < first


def ask(tracks, kind: str, rng: random.Random) -> tuple[str, str] | None:
    """A question of `kind` about the video and its one-word answer; None when the video cannot answer one."""
    if kind == "direction":
        tr = rng.choice(tracks)
        return f"which way does the {tr.name} move?", tr.direction
    if kind == "first":
        return "which colour appears first?", min(tracks, key=lambda tr: tr.appear).colour
    if kind == "count":
        return "how many shapes appear?", NUMBERS[len(tracks)]
    pairs = [(a, b) for a in tracks for b in tracks if a is not b and closing(a, b) is not None]
    if not pairs:
        return None
    a, b = rng.choice(pairs)
    return f"does the {a.shape} move toward the {b.shape}?", "yes" if closing(a, b) else "no"


def example(split: str, index: int) -> VideoExample:
    """Example `index` of `split` ("train" or "heldout"), deterministic; question types cycle."""
    rng = _rng(split, index)
    kind = QUESTION_TYPES[index % len(QUESTION_TYPES)]
    while True:
        tracks = sample_tracks(rng, n_min=2 if kind == "toward" else 1)
        qa = ask(tracks, kind, rng)
        if qa is not None:
            return VideoExample(tracks, *qa, kind)


def describe(tracks) -> str:
    """Every shape in order of entry: "red square moves right from row one column two , ..."."""
    return " , ".join(f"{tr.name} moves {tr.direction} from {cell_name(tr.at(tr.appear))}" for tr in tracks)


def conversation(split: str, index: int) -> tuple[tuple[Track, ...], list[tuple[str, str]]]:
    """One video, a description of it and a question of every type it can answer, in random order."""
    rng = _rng(split, index)
    tracks = sample_tracks(rng)
    kinds = rng.sample(QUESTION_TYPES, len(QUESTION_TYPES))
    turns = [qa for qa in (ask(tracks, kind, rng) for kind in kinds) if qa is not None]
    turns.insert(rng.randrange(len(turns) + 1), ("describe the video.", describe(tracks)))
    return tracks, turns


def corpus() -> list[str]:
    """Every word the task can use, for training the tokenizer."""
    words = [*COLOURS, *SHAPES, *NUMBERS, *DIRECTIONS, "row", "column", "yes", "no", "moves", "from"]
    questions = [example("train", i).question for i in range(400)]
    return words + questions + ["describe the video.", ","]


def make_batch(pipe, split: str, indices, *, blank_images: bool = False):
    """Single-turn prompts about examples `indices` of `split`: (inputs.Batch, the examples). blank_images shows
    the model empty frames instead, to measure what it can answer without looking."""
    from minifastv.inputs import questions

    size = pipe.model.config.vision.image_size
    examples = [example(split, i) for i in indices]
    requests = [([], ex.question, [video_frames((), size) if blank_images else ex.frames(size)]) for ex in examples]
    return questions(pipe.tokenizer, pipe.model.config, requests), examples


def evaluate(pipe, n: int = 400, **kwargs) -> dict[str, float]:
    """shapes.evaluate on this task: exact-match accuracy per question type and "all", relative FLOPs, kept share."""
    return shapes.evaluate(pipe, n, make=make_batch, kinds=QUESTION_TYPES, **kwargs)


def majority_baseline(n: int = 400, split: str = "heldout") -> dict[str, float]:
    """Accuracy of always giving each question type's most frequent answer."""
    return shapes.majority_baseline(n, split, task_example=example, kinds=QUESTION_TYPES)


def write_video(path, frames, fps: int = 4) -> None:
    """Frames as a lossless video file (FFV1 in Matroska; PyAV, the [video] extra): decoded, it gives back the
    exact pixels, so a model reading the file sees what evaluate() draws."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("ffv1", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames[0].width, frames[0].height, "bgr0"
        for frame in frames:
            out.mux(stream.encode(av.VideoFrame.from_image(frame).reformat(format="bgr0")))
        out.mux(stream.encode())


def write_samples(directory, n: int = 4, size: int = SIZE) -> None:
    """The first n held-out examples (one per question type) as video files plus video_questions.json, for the
    demo: python -c "from video_shapes import write_samples; write_samples('minifastv/data/samples')"."""
    import json
    from pathlib import Path

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(n):
        ex = example("heldout", i)
        write_video(directory / f"heldout_video_{i}.mkv", ex.frames(size))
        entries.append({"video": f"heldout_video_{i}.mkv", "question": ex.question, "answer": ex.answer})
    (directory / "video_questions.json").write_text(json.dumps(entries, indent=2) + "\n")


def write_task_data(directory, n: int = 400, size: int = SIZE) -> None:
    """The first n held-out examples for the lmms-eval task minifastv_shapes_video: heldout.jsonl (id, kind,
    question, answer, the video's file name) and the videos, lossless, under videos/ (lmms-eval's video tasks
    give the model paths): python -c "from video_shapes import write_task_data;
    write_task_data('minifastv/eval/tasks/minifastv_shapes_video')"."""
    import json
    from pathlib import Path

    directory = Path(directory)
    (directory / "videos").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        ex = example("heldout", i)
        write_video(directory / "videos" / f"heldout_{i}.mkv", ex.frames(size))
        lines.append(json.dumps({"id": i, "kind": ex.kind, "question": ex.question, "answer": ex.answer,
                                 "video": f"heldout_{i}.mkv"}))
    (directory / "heldout.jsonl").write_text("\n".join(lines) + "\n")
