"""What the model did, per task: the records of each request summed up, and the stats file."""

from __future__ import annotations

import json
import os
from pathlib import Path


def mean(values):
    values = list(values)
    return sum(values) / len(values) if values else None


def summarize(records: list[dict], **header) -> dict:
    """Per task: requests, failures, and the means over the requests that ran of the image tokens, those kept,
    the prefill FLOPs relative to unpruned, prefill and decode seconds and decode steps."""
    tasks = {}
    for task in sorted({r["task"] for r in records}):
        mine = [r for r in records if r["task"] == task]
        ran = [r for r in mine if "error" not in r]
        tasks[task] = {"requests": len(mine), "failed": len(mine) - len(ran),
                       "image_tokens": mean(r["image_tokens"] for r in ran),
                       "kept_image_tokens": mean(r["kept_image_tokens"] for r in ran),
                       "relative_prefill_flops": mean(r["flops"] / r["flops_unpruned"] for r in ran),
                       "prefill_s": mean(r["prefill_s"] for r in ran), "decode_s": mean(r["decode_s"] for r in ran),
                       "decode_steps": mean(r["decode_steps"] for r in ran)}
    return {**header, "tasks": tasks, "requests": sorted(records, key=lambda r: (r["task"], *in_order(r["doc_id"])))}


def in_order(doc_id) -> tuple:
    """A sort key putting integer ids in numeric order (2 before 10), then any others by their text."""
    return (0, doc_id, "") if isinstance(doc_id, int) else (1, 0, str(doc_id))


def write_json(path, data):
    """Written whole or not at all: a temporary file renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def exact_match_by_kind(doc: dict, results: list, kinds) -> dict:
    """The offline tasks' scores of one document: exact_match (the stripped answer equals doc["answer"]), and
    under each kind of question (True, correct) for the document's own kind, (False, 0) for the others, so
    that mean_of_kind counts each kind's documents only."""
    correct = float(results[0].strip() == doc["answer"])
    return {"exact_match": correct, **{kind: (kind == doc["kind"], correct) for kind in kinds}}


def mean_of_kind(items):
    scores = [correct for mine, correct in items if mine]
    return sum(scores) / len(scores) if scores else float("nan")
