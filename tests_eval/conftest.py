"""Tests of minifastv inside lmms-eval (the `[eval]` extra), run by .ci/run in an environment of their own:
lmms-eval pulls in far more than the core tests need."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Offline, as the machines this runs on: lmms-eval and datasets must not reach for a hub (the runs inherit it).
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
sys.path.insert(0, str(ROOT))  # shapes.py (the tiny task's generator and evaluate_tiny's scorer)


def load_module(path: Path):
    """A Python file by its path (the task's utils.py, a core test's helpers): names like `tests` or `utils`
    may be taken by installed packages."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_loaded_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class Run:
    results: dict       # lmms-eval's results file
    samples: dict       # doc_id -> the logged sample
    stats: dict         # minifastv's stats.json
    log: str

    def score(self, task="minifastv_shapes", metric="exact_match"):
        return self.results["results"][task][f"{metric},none"]

    def answers(self):
        return {d: s["filtered_resps"] for d, s in self.samples.items()}


def lmms_eval(out: Path, model_args: str = "", *, tasks="minifastv_shapes", batch_size=16, processes=1,
              limit=None, include: Path | None = None, check=True) -> Run:
    """The real lmms-eval command line (under accelerate for several processes), its files read back;
    `include`: the task directory (lmms-eval takes one; default minifastv's)."""
    from minifastv.eval import TASKS

    launcher = [sys.executable, "-m", "lmms_eval"]
    if processes > 1:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                    str(processes), "-m", "lmms_eval"]
    args = ",".join(a for a in (f"stats={out / 'stats.json'}", "dtype=float32", model_args) if a)
    cmd = launcher + ["--model", "minifastv", "--model_args", args, "--tasks", tasks, "--include_path",
                      str(include or TASKS), "--batch_size", str(batch_size),
                      "--output_path", str(out), "--log_samples"]
    if limit is not None:
        cmd += ["--limit", str(limit)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=out.parent)
    log = r.stdout + r.stderr
    results = sorted(out.rglob("*_results.json"))
    if check:
        assert r.returncode == 0 and results, log[-4000:]
    samples = {}
    for f in out.rglob("*_samples_*.jsonl"):
        for line in f.read_text().splitlines():
            s = json.loads(line)
            samples[s["doc_id"]] = s
    stats = json.loads((out / "stats.json").read_text()) if (out / "stats.json").is_file() else {}
    return Run(json.loads(results[-1].read_text()) if results else {}, samples, stats, log)


@pytest.fixture(scope="session")
def pipe():
    from minifastv.data import TINY_MODEL
    from minifastv.pipeline import Pipeline

    return Pipeline.load(TINY_MODEL, dtype="float32")


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """lmms-eval runs shared by several tests, each made once: runs(name, model_args, **options)."""
    made = {}
    root = tmp_path_factory.mktemp("lmms")

    def get(name, model_args="", **options):
        if name not in made:
            made[name] = lmms_eval(root / name, model_args, **options)
        return made[name]

    return get
