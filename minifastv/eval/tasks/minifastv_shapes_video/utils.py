"""The minifastv_shapes_video task: documents to video paths and prompts, answers to scores (exact match, per
kind of question)."""

from pathlib import Path

from minifastv.eval.stats import exact_match_by_kind, mean_of_kind  # noqa: F401 (the YAML names mean_of_kind)

KINDS = ("direction", "first", "toward", "count")
VIDEOS = Path(__file__).parent / "videos"


def doc_to_visual(doc):
    """The document's video, as a path (lmms-eval's video tasks give paths; the model reads the file)."""
    return [str(VIDEOS / doc["video"])]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    """exact_match over every document, and the accuracy per kind of question (minifastv.eval.stats)."""
    return exact_match_by_kind(doc, results, KINDS)
