"""minifastv's video model inside lmms-eval: the offline video task (doc_to_visual gives video paths, as
lmms-eval's video tasks do) through the real CLI reproduces `evaluate_tiny.py --video` exactly, unpruned and
pruned; its data is the held-out split; video markers and bad videos are the request's, named."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import load_module

from minifastv.eval import TASKS
from minifastv.pruning import make
from video_shapes import evaluate, example, write_task_data

TASK_DIR = TASKS / "minifastv_shapes_video"
N = 400


@pytest.fixture(scope="module")
def video_pipe():
    from minifastv.data import TINY_VIDEO_MODEL
    from minifastv.pipeline import Pipeline

    return Pipeline.load(TINY_VIDEO_MODEL, dtype="float32")


def test_task_data_is_the_held_out_split(tmp_path):
    from minifastv.video import read_frames

    write_task_data(tmp_path, n=6)
    lines = (TASK_DIR / "heldout.jsonl").read_text().splitlines()
    assert len(lines) == N and (tmp_path / "heldout.jsonl").read_text().splitlines() == lines[:6]
    for i in range(6):
        doc = json.loads(lines[i])
        assert doc["question"] == example("heldout", i).question
        shipped = read_frames(TASK_DIR / "videos" / doc["video"], 8)
        assert all(np.array_equal(np.asarray(a), np.asarray(b.convert("RGB")))
                   for a, b in zip(shipped, example("heldout", i).frames()))


CASES = [("none", ""), ("fastv K=2", "prune=fastv,prune_ratio=0.5,prune_k=2"),
         ("fastv K=5", "prune=fastv,prune_ratio=0.5,prune_k=5"), ("uniform", "prune=uniform,prune_ratio=0.75")]


@pytest.mark.parametrize("name,args", CASES, ids=[c[0] for c in CASES])
def test_video_task_reproduces_evaluate_tiny(runs, video_pipe, name, args):
    from minifastv.data import TINY_VIDEO_MODEL

    run = runs(f"video-{name}", f"pretrained={TINY_VIDEO_MODEL}" + (f",{args}" if args else ""),
               tasks="minifastv_shapes_video")
    prune = {"none": None, "fastv K=2": make("fastv", 0.5, 2), "fastv K=5": make("fastv", 0.5, 5),
             "uniform": make("uniform", 0.75)}[name]
    reference = evaluate(video_pipe, N, prune=prune)
    task = "minifastv_shapes_video"
    assert run.score(task) == reference["all"]
    for kind in ("direction", "first", "toward", "count"):
        assert run.score(task, kind) == reference[kind]
    stats = run.stats["tasks"][task]
    assert stats["requests"] == N and stats["failed"] == 0
    assert stats["relative_prefill_flops"] == pytest.approx(reference["flops"], abs=1e-12)


def test_video_markers_and_bad_videos_are_the_requests(tmp_path):
    from minifastv.data import TINY_MODEL, TINY_VIDEO_MODEL
    from minifastv.eval.lmms import MiniFastV, RequestError

    assert MiniFastV.question("<video>\nhow many shapes appear?", [], ["v"]) == "how many shapes appear?"
    with pytest.raises(RequestError, match="1 <video> marker"):
        MiniFastV.question("<video>\nwhat?", [], [])
    utils = load_module(TASK_DIR / "utils.py")
    doc = json.loads((TASK_DIR / "heldout.jsonl").read_text().splitlines()[0])
    broken = tmp_path / "broken.mp4"
    broken.write_text("not a video")
    for pretrained, visual, says in ((TINY_VIDEO_MODEL, lambda d: [str(broken)], "broken.mp4: not a video"),
                                     (TINY_MODEL, utils.doc_to_visual, "takes no video")):
        m = MiniFastV(pretrained=str(pretrained), dtype="float32")
        m.task_dict = {"t": {"test": [doc]}}
        with pytest.raises(RequestError, match=says):
            m.visuals(visual, "t", "test", 0)
