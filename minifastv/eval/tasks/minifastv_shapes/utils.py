"""The minifastv_shapes task: documents to images and prompts, answers to scores (exact match, per kind)."""

import base64
import io

from PIL import Image

from minifastv.eval.stats import exact_match_by_kind, mean_of_kind  # noqa: F401 (the YAML names mean_of_kind)

KINDS = ("colour", "shape_at", "count", "exists")
ANYRES_KINDS = ("colour", "shape", "exists")   # anyres_shapes.py's (minifastv_shapes_anyres)
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
    """exact_match over every document, and the accuracy per kind of question (minifastv.eval.stats)."""
    return exact_match_by_kind(doc, results, KINDS)


def process_anyres_results(doc, results):
    return exact_match_by_kind(doc, results, ANYRES_KINDS)
