"""The shipped tiny model's CLIP text tower (train_tiny.py --clip-text): its relevance points at the cell a question
names, and its training leaves the rest of the model as it was."""

from __future__ import annotations

import re

import torch

import shapes
import train_tiny
from minifastv import Pipeline
from minifastv.data import TINY_MODEL
from minifastv.pruning import BeforeDecoder

NUMBER = {w: i for i, w in enumerate(shapes.NUMBERS)}


class Probe(BeforeDecoder):
    """Keeps everything; records each sample's relevance over its 64 patches."""

    vision_score = "relevance"

    def select(self, ctx):
        ctx.memo["seen"] = ctx.vision_scores[ctx.image_mask].view(len(ctx.image_mask), -1)
        Probe.last = ctx.memo["seen"]
        return ctx.image_mask.clone()


@torch.no_grad()
def test_relevance_finds_the_cell_the_question_names(tiny_pipe):
    """Of the 4 patches of the named cell, the 4 most relevant hold far more than chance (4 of 64) would."""
    batch, examples = shapes.make_batch(tiny_pipe, "heldout", range(200))
    tiny_pipe.model.prefill(**batch.model_inputs(), prune=Probe(ratio=0.0))
    found = []
    for ex, relevance in zip(examples, Probe.last):
        cell = re.search(r"row (\w+) column (\w+)", ex.question)
        if ex.kind not in ("colour", "shape_at") or cell is None:
            continue
        r, c = (NUMBER[w] - 1 for w in cell.groups())
        patches = set(torch.arange(64).view(8, 8)[2 * r:2 * r + 2, 2 * c:2 * c + 2].flatten().tolist())
        found.append(len(patches & set(relevance.topk(4).indices.tolist())) / 4)
    assert len(found) == 100 and sum(found) / len(found) >= 0.3


def test_training_the_tower_changes_nothing_else(tmp_path):
    pipe = Pipeline.load(TINY_MODEL, dtype="float32")
    assert pipe.tokenizer is pipe.model.clip_text.tokenizers[0]   # tokenizer.json read once, shared with the tower
    before = {k: v.clone() for k, v in pipe.model.state_dict().items() if not k.startswith("clip_text.")}
    tower = train_tiny.train_clip_text(pipe, steps=3, seed=0, batch_size=8, log=lambda _: None).model.clip_text
    after = pipe.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert pipe.model.config.clip_text.relevance_sign == 1 and tower.tokenizers[0] is pipe.tokenizer
    ids = torch.tensor([pipe.tokenizer.first_turn("which shape is in row two column three?")])
    assert tower.directions(ids).shape == (1, pipe.model.config.clip_text.projection_dim)
