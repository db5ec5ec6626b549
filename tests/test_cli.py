"""The command line, end to end on the shipped tiny model, as a user runs it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = json.loads((ROOT / "samples" / "questions.json").read_text())[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny-preset checkpoint with seeded random weights: the CLI's mechanics, not the answers' quality
    (test_tiny.py checks the shipped model's accuracy)."""
    import train_tiny

    import minifastv

    path = tmp_path_factory.mktemp("cli") / "tiny"
    minifastv.save(train_tiny.build_model(train_tiny.build_tokenizer(), seed=0), path)
    return path


def run(*args):
    return subprocess.run([sys.executable, "-m", "minifastv", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


@pytest.mark.parametrize("command", ["generate", "demo", "analyze", "convert", "bench"])
def test_help(command):
    result = run(command, "--help")
    usage = "usage: bench.py" if command == "bench" else "usage: python -m minifastv " + command
    assert result.returncode == 0 and usage in result.stdout, result.stderr


def test_generate_with_fastv(model_dir):
    result = run("generate", "--model", model_dir, "--image", ROOT / "samples" / SAMPLE["image"],
                 "--prompt", SAMPLE["question"], "--fastv-k", 2, "--fastv-ratio", 0.5, "--max-new-tokens", 4)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 and len(lines[0].split()) == 4  # four streamed tokens, then the summary
    assert "image tokens kept 32/64" in lines[1] and "theoretical prefill FLOPs" in lines[1]


def test_demo(model_dir):
    result = run("demo", "--model", model_dir)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("FastV off") == len(json.loads((ROOT / "samples" / "questions.json").read_text()))
    assert "image tokens kept 32/64" in result.stdout


def test_analyze_writes_valid_pngs(model_dir, tmp_path):
    result = run("analyze", "--model", model_dir, "--image", ROOT / "samples" / SAMPLE["image"],
                 "--prompt", SAMPLE["question"], "--out-dir", tmp_path, "--fastv-k", 2, "--fastv-ratio", 0.75)
    assert result.returncode == 0, result.stderr
    assert "| layer |" in result.stdout and "keeps 16 of 64 patches" in result.stdout
    for name in ("attention_shares.png", "kept_patches.png"):
        with Image.open(tmp_path / name) as im:
            im.verify()
        with Image.open(tmp_path / name) as im:
            assert im.format == "PNG" and min(im.size) >= 300


def test_bad_input_is_a_message_not_a_traceback(model_dir, tmp_path):
    result = run("generate", "--model", model_dir, "--image", tmp_path / "missing.png", "--prompt", "hi")
    assert result.returncode == 2
    assert "missing.png" in result.stderr and "Traceback" not in result.stderr
