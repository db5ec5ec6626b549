"""The minifastv_shapes task: documents to images and prompts, answers to scores (exact match, per kind)."""

import base64
import io

from PIL import Image

KINDS = ("colour", "shape_at", "count", "exists")
CHOICES = {"colour": ["red", "green", "blue", "yellow"], "shape_at": ["square", "circle", "triangle"],
           "count": ["zero", "one", "two", "three", "four", "five"], "exists": ["yes", "no"]}  # shapes.py's answers


def doc_to_visual(doc):
    """The document's image (base64 PNG); none when the document has no image."""
    if not doc.get("image"):
        return []
    return [Image.open(io.BytesIO(base64.b64decode(doc["image"])))]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def doc_to_choice(doc):
    """The answers a question of the document's kind can have (minifastv_shapes_choice)."""
    return CHOICES[doc["kind"]]


def process_results(doc, results):
    """exact_match over every document; under the document's kind, (True, correct), and (False, 0) under the
    other kinds, so each kind's mean counts its own documents only."""
    correct = float(results[0].strip() == doc["answer"])
    return {"exact_match": correct, **{kind: (kind == doc["kind"], correct) for kind in KINDS}}


def mean_of_kind(items):
    scores = [correct for mine, correct in items if mine]
    return sum(scores) / len(scores) if scores else float("nan")
