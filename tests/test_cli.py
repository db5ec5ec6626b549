"""The command line, end to end on the shipped tiny model, as a user runs it."""

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import run_cli
from PIL import Image

from minifastv.data import SAMPLES

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = json.loads((SAMPLES / "questions.json").read_text())[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny-preset checkpoint with seeded random weights: the CLI's mechanics, not the answers' quality
    (test_tiny.py checks the shipped model's accuracy)."""
    import minifastv
    import train_tiny

    path = tmp_path_factory.mktemp("cli") / "tiny"
    tok = train_tiny.build_tokenizer()
    minifastv.save(train_tiny.build_model(tok, seed=0), tok, path)
    return path


@pytest.mark.parametrize("command", ["generate", "demo", "analyze", "convert", "bench"])
def test_help(command):
    result = run_cli(command, "--help")
    usage = "usage: python -m minifastv " + command
    assert result.returncode == 0 and usage in result.stdout, result.stderr


@pytest.mark.parametrize("command, said", [("chat", "/reset to start over"), ("convert", "docs/converting.md"),
                                           ("quantize", "a scale and zero point per group")])
def test_help_describes_the_command(command, said, capsys):
    from minifastv.cli import main

    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert said in " ".join(capsys.readouterr().out.split())


def test_generate_with_fastv(model_dir):
    result = run_cli("generate", "--model", model_dir, "--image", SAMPLES / SAMPLE["image"],
                     "--prompt", SAMPLE["question"], "--fastv-k", 2, "--fastv-ratio", 0.5, "--max-new-tokens", 4)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 and len(lines[0].split()) == 4  # four streamed tokens, then the summary
    assert "image tokens kept 32/64" in lines[1] and "theoretical prefill FLOPs" in lines[1]


def test_demo(model_dir):
    result = run_cli("demo", "--model", model_dir)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("unpruned") == len(json.loads((SAMPLES / "questions.json").read_text()))
    assert "image tokens kept 32/64" in result.stdout
    assert "(x: not the expected answer" not in result.stdout   # the note is about the shipped model


def test_demo_marks_the_answers_that_miss_and_says_why_fastv_misses():
    from minifastv.data import TINY_MODEL

    result = run_cli("demo", "--model", TINY_MODEL)
    assert result.returncode == 0, result.stderr
    expected, missed = None, False
    for line in result.stdout.splitlines():
        if "(expected: " in line:
            expected = line.split("(expected: ")[1].rstrip(")")
        elif " -> " in line:
            mark, answer = line[2:4], line.split(" -> ")[1].split()[0]
            assert mark == ("  " if answer == expected else "x "), line
            missed |= mark == "x " and "FastV" in line
    assert missed == ("(x: not the expected answer" in result.stdout) and missed   # the shipped model misses some


def test_analyze_writes_valid_pngs(model_dir, tmp_path):
    result = run_cli("analyze", "--model", model_dir, "--image", SAMPLES / SAMPLE["image"],
                     "--prompt", SAMPLE["question"], "--out-dir", tmp_path, "--fastv-k", 2, "--fastv-ratio", 0.75)
    assert result.returncode == 0, result.stderr
    assert "| layer |" in result.stdout and "keeps 16 of 64 patches" in result.stdout
    for name in ("attention_shares.png", "kept_patches.png"):
        with Image.open(tmp_path / name) as im:
            im.verify()
        with Image.open(tmp_path / name) as im:
            assert im.format == "PNG" and min(im.size) >= 300


def test_bad_input_is_a_message_not_a_traceback(model_dir, tmp_path):
    result = run_cli("generate", "--model", model_dir, "--image", tmp_path / "missing.png", "--prompt", "hi")
    assert result.returncode == 2
    assert "missing.png" in result.stderr and "Traceback" not in result.stderr


def generate_in_process(model_dir, capsys, *options):
    from minifastv.cli import main

    code = main(["generate", "--model", str(model_dir), "--image", str(SAMPLES / SAMPLE["image"]),
                 "--prompt", SAMPLE["question"], "--max-new-tokens", "2", *map(str, options)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_printed_kept_count_and_flops_come_from_the_model(model_dir, capsys, monkeypatch):
    """Break the pruning (keep a quarter where the settings say half): the printed figures follow the model."""
    import minifastv.models.llama

    code, honest, _ = generate_in_process(model_dir, capsys, "--fastv-k", 2, "--fastv-ratio", 0.5)
    assert code == 0 and "image tokens kept 32/64" in honest
    monkeypatch.setattr(minifastv.pruning.schedule, "stage_counts", lambda method, stage, n, n_first: [i // 4 for i in n])
    code, broken, _ = generate_in_process(model_dir, capsys, "--fastv-k", 2, "--fastv-ratio", 0.5)
    assert code == 0 and "image tokens kept 16/64" in broken
    flops = [float(text.split("theoretical prefill FLOPs ")[1].split("%")[0]) for text in (honest, broken)]
    assert flops[1] < flops[0]


@pytest.mark.parametrize("options, method", [
    (("--prune", "random", "--prune-ratio", 0.75, "--prune-k", 1, "--prune-seed", 3),
     "RandomDrop(k=1, ratio=0.75, seed=3)"),
    (("--prune", "fastv", "--prune-ratio", 0.25), "FastV(k=2, ratio=0.25)"),
    (("--fastv-k", 3, "--fastv-ratio", 0.75), "FastV(k=3, ratio=0.75)"),
    (("--fastv-k", 1), "FastV(k=1, ratio=0.5)"),
    ((), "None"),
])
def test_pruning_flags_reach_the_model(model_dir, capsys, monkeypatch, options, method):
    from minifastv.pipeline import Pipeline

    seen = []
    real = Pipeline.answer
    monkeypatch.setattr(Pipeline, "answer", lambda self, images, q, **k: seen.append(k["prune"])
                        or real(self, images, q, **k))
    code, _, err = generate_in_process(model_dir, capsys, *options)
    assert code == 0, err
    assert repr(seen[0]) == method


@pytest.mark.parametrize("options, message", [
    (("--fastv-ratio", 0.5), "--fastv-ratio needs --fastv-k"),
    (("--prune-ratio", 0.5), "--prune-ratio given without --prune NAME"),
    (("--prune", "fastv", "--fastv-k", 2), "--fastv-k is FastV's own spelling and cannot be mixed with --prune"),
    (("--prune", "fastv", "--prune-seed", 1), "'fastv' takes no seed"),
])
def test_pruning_flag_mistakes_are_one_line_errors(model_dir, capsys, options, message):
    code, _, err = generate_in_process(model_dir, capsys, *options)
    assert code == 2 and message in err and "Traceback" not in err


def test_bench_measures_the_method_asked_for(capsys, monkeypatch):
    """bench on the shipped tiny model: the pruning flags reach its table, whose kept counts and theoretical
    FLOPs are the model's report of the setting asked for, and whose label is the setting that ran; a load
    average above the threads is warned about, and the prefill's spread is printed beside its median."""
    import os

    import torch

    from minifastv import RandomDrop, load
    from minifastv.bench.fastv import prompt
    from minifastv.cli import main
    from minifastv.data import TINY_MODEL

    monkeypatch.setattr(os, "getloadavg", lambda: (5.0, 1.0, 1.0))
    assert main(["bench", "--repeats", "2", "--decode-tokens", "3", "--no-hf", "--prune", "random",
                 "--prune-k", "1", "--threads", "2"]) == 0
    out = capsys.readouterr().out
    assert "RandomDrop(k=1, ratio=R, seed=0)" in out and "3 new tokens, median of 2" in out
    assert "2 threads; load average 5.0\nwarning: the load average is above the 2 threads used" in out
    assert "| prefill ms (spread) |" in out
    model = load(TINY_MODEL)
    with torch.inference_mode():
        for ratio, kept in ((0.5, 32), (0.75, 16)):
            pre = model.prefill(*prompt(model.config), prune=RandomDrop(1, ratio))
            assert f"| {ratio} | {kept} | {pre.flops[0] / pre.flops_unpruned[0]:.1%} |" in out
    assert "prefill = vision tower + decoder, median of 2" in out


def test_bench_against_transformers_on_the_shipped_model(capsys):
    """The comparison runs on the tiny model, whose random prompt may use any id: transformers' placeholder
    is one it does not use. One new token: no decode rate, no error."""
    from minifastv.cli import main

    assert main(["bench", "--repeats", "1", "--decode-tokens", "1"]) == 0
    out = capsys.readouterr().out
    assert "greedy tokens identical over 8 steps: True" in out and "1 new token," in out
    assert "| minifastv speedup |" in out


@pytest.mark.parametrize("flags,message", [(["--repeats", "0"], "--repeats must be at least 1, got 0"),
                                           (["--decode-tokens", "0"], "--decode-tokens must be at least 1"),
                                           (["--threads", "0"], "--threads must be at least 1"),
                                           (["--layers", "2"], "--layers sets the depth of --model 7b")])
def test_bench_refuses_settings_it_cannot_use(capsys, flags, message):
    from minifastv.cli import main

    assert main(["bench", "--no-hf", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_analyze_prints_the_kept_patches_and_draws_every_method(model_dir, tmp_path):
    import torch

    from minifastv.analyze import kept_patches
    from minifastv.pipeline import Pipeline
    from minifastv.pruning import METHODS, DivPrune

    result = run_cli("analyze", "--model", model_dir, "--image", SAMPLES / SAMPLE["image"], "--prompt",
                     SAMPLE["question"], "--out-dir", tmp_path, "--prune", "divprune", "--prune-ratio", 0.75,
                     "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    line = next(x for x in result.stdout.splitlines() if x.startswith("kept patches: "))
    printed = [int(i) for i in line.removeprefix("kept patches: ").split(", ")]
    pipe = Pipeline.load(model_dir, dtype="float32")
    batch = pipe.inputs([SAMPLES / SAMPLE["image"]], SAMPLE["question"])
    with torch.no_grad():
        assert printed == kept_patches(pipe.model, batch.input_ids, batch.pixel_values, DivPrune(0.75))
    assert len(printed) == 16
    with Image.open(tmp_path / "kept_patches.png") as one, Image.open(tmp_path / "kept_patches_methods.png") as every:
        rows = -(-len(METHODS) // 3)                           # three to a row, each with its label
        assert every.width == 3 * (one.width + 12) - 12 and every.height == rows * (one.height - 30) + 30


def test_generate_json_is_the_models_report(model_dir, capsys):
    import torch

    from minifastv import FastV, chat_prompt
    from minifastv.pipeline import Pipeline

    code, out, err = generate_in_process(model_dir, capsys, "--json", "--fastv-k", 2, "--fastv-ratio", 0.75)
    assert code == 0, err
    got = json.loads(out)
    pipe = Pipeline.load(model_dir)
    with torch.no_grad():
        ref = pipe.answer([SAMPLES / SAMPLE["image"]], SAMPLE["question"], prune=FastV(2, 0.75), max_new_tokens=2)
    assert got["text"] == ref.text and got["token_ids"] == ref.token_ids
    assert got["kept_image_tokens"] == 16 and got["kept_image_slots"] == ref.kept_image_slots
    assert (got["flops"], got["flops_unpruned"]) == (ref.flops, ref.flops_unpruned)
    assert got["n_prompt_tokens"] == ref.n_prompt_tokens and got["n_image_tokens"] == 64
    # The prompt as the model received it: the template rebuilt from it, one placeholder for the image.
    assert got["prompt_ids"] == pipe.tokenizer.encode_prompt(chat_prompt(SAMPLE["question"])) == ref.prompt_ids
    assert got["prompt_ids"].count(pipe.model.config.image_token_id) == 1
    assert got["n_prompt_tokens"] == len(got["prompt_ids"]) - 1 + 64


def test_sampling_flags_reach_the_model_and_the_seed_reproduces(model_dir, capsys, monkeypatch):
    from minifastv.pipeline import Pipeline

    def answer_text(*options):
        code, out, err = generate_in_process(model_dir, capsys, "--json", "--max-new-tokens", 2, *options)
        assert code == 0, err
        return json.loads(out)["token_ids"]

    hot = ("--temperature", 50.0)
    assert answer_text(*hot, "--seed", 1) == answer_text(*hot, "--seed", 1)
    assert len({tuple(answer_text(*hot, "--seed", s)) for s in range(6)}) > 1   # different seeds, different draws
    seen = []
    real = Pipeline.answer
    monkeypatch.setattr(Pipeline, "answer", lambda self, images, q, **k: seen.append(k) or real(self, images, q, **k))
    answer_text("--temperature", 0.7, "--top-p", 0.3, "--seed", 5, "--max-new-tokens", 3)
    assert seen[-1]["temperature"] == 0.7 and seen[-1]["top_p"] == 0.3 and seen[-1]["max_new_tokens"] == 3
    assert seen[-1]["generator"].initial_seed() == 5


def test_bench_on_a_missing_or_small_checkpoint(model_dir, capsys, tmp_path):
    """A missing directory is a one-line error; a small converted checkpoint whose vocabulary holds the image
    id among the first ids runs (the random prompt never draws the placeholder)."""
    from helpers import hf_llava, to_minifastv

    import minifastv
    from minifastv.cli import main

    assert main(["bench", "--model", str(tmp_path / "nothing"), "--no-hf"]) == 2
    assert "nothing: checkpoint directory not found" in capsys.readouterr().err
    small = to_minifastv(hf_llava(seed=2))                   # vocabulary 128, image id 127
    minifastv.save(small, minifastv.load_tokenizer(model_dir), tmp_path / "small")
    assert main(["bench", "--model", str(tmp_path / "small"), "--repeats", "1", "--decode-tokens", "2", "--no-hf"]) == 0
    assert "| 0.5 |" in capsys.readouterr().out


def test_help_shows_the_defaults():
    result = run_cli("generate", "--help")
    text = " ".join(result.stdout.split())
    for default in ("(default: 64)", "(default: 0.0)", "(default: 1.0)", "(default: auto)", "(default: cpu)"):
        assert default in text, default


def test_generate_batch_file_answers_every_line_in_order(model_dir, capsys, tmp_path, monkeypatch):
    """Left-padded batches of --batch-size; one JSON line per input line, in input order; bad lines are named
    by their line number and the rest still run; each answer equals the same question asked alone."""
    from minifastv.pipeline import Pipeline

    questions = json.loads((SAMPLES / "questions.json").read_text())
    lines = [json.dumps({"image": str(SAMPLES / q["image"]), "prompt": q["question"]}) for q in questions]
    lines.insert(2, "{not json")
    lines.insert(4, json.dumps({"image": str(tmp_path / "missing.png"), "prompt": "what colour"}))
    lines.append(json.dumps({"image": [str(SAMPLES / questions[0]["image"])] * 2, "prompt": questions[0]["question"]}))
    batch_file = tmp_path / "in.jsonl"
    batch_file.write_text("\n".join(lines) + "\n")
    from minifastv.cli import main

    sizes, real = [], Pipeline.answer_batch
    monkeypatch.setattr(Pipeline, "answer_batch", lambda self, requests, **k: sizes.append(len(requests))
                        or real(self, requests, **k))
    code = main(["generate", "--model", str(model_dir), "--batch", str(batch_file), "--batch-size", "2",
                 "--max-new-tokens", "3", "--fastv-k", "2", "--dtype", "float32"])
    out, err = capsys.readouterr()
    results = [json.loads(line) for line in out.splitlines()]
    assert code == 1 and [r["line"] for r in results] == list(range(1, len(lines) + 1))  # 1: some lines failed
    assert "line 3" not in err and "2 of 7 lines failed" in err
    assert sizes == [2, 2, 1]                                # the five good lines, --batch-size 2 at a time
    assert f"{batch_file}:3:" in results[2]["error"] and "missing.png" in results[4]["error"]
    pipe = Pipeline.load(model_dir, dtype="float32")
    from minifastv import FastV

    for r, line in zip(results, lines):
        if "error" in r:
            continue
        item = json.loads(line)
        images = item["image"] if isinstance(item["image"], list) else [item["image"]]
        alone = pipe.answer(images, item["prompt"], prune=FastV(2, 0.5), max_new_tokens=3)
        assert r["token_ids"] == alone.token_ids and r["kept_image_slots"] == alone.kept_image_slots
        assert r["kept_image_tokens"] == 32 * len(images) and r["flops"] == alone.flops


@pytest.mark.parametrize("options, message", [
    (("--batch", "x.jsonl", "--prompt", "what colour"), "--batch FILE takes the images, videos and prompts from the "
                                                        "file: drop --image, --video and --prompt"),
    (("--batch", "x.jsonl", "--video", "v.mp4"), "--batch FILE takes the images, videos and prompts from the file"),
    ((), "generate needs --image or --video, and --prompt; or --batch FILE.jsonl"),
    (("--video", "v.mp4"), "generate needs --image or --video, and --prompt"),
])
def test_generate_input_mistakes(model_dir, capsys, options, message):
    from minifastv.cli import main

    code = main(["generate", "--model", str(model_dir), *options])
    assert code == 2 and message in capsys.readouterr().err


def test_one_decode_step_is_singular(model_dir, capsys):
    code, out, _ = generate_in_process(model_dir, capsys)      # two new tokens: the prefill's and one step
    assert code == 0 and "decode 1 step in" in out, out


def test_converted_checkpoints_are_not_tracked_by_git():
    """weights/ holds converted checkpoints: git ignores all of it but its README."""
    def ignored(path):
        return subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT).returncode == 0

    assert (ROOT / "weights" / "README.md").is_file() and not ignored("weights/README.md")
    assert ignored("weights/llava-1.5-7b/model.safetensors") and ignored("weights/tiny")


def small_evaluate_tiny(tmp_path, monkeypatch):
    """evaluate_tiny, run in tmp_path with one budget and one (K, R): its main."""
    import evaluate_tiny

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(evaluate_tiny, "BUDGETS", (0.5,))
    monkeypatch.setattr(evaluate_tiny, "GRID_K", (2,))
    monkeypatch.setattr(evaluate_tiny, "GRID_R", (0.5,))
    return evaluate_tiny.main


def test_evaluate_tiny_writes_its_pictures_to_results_unless_told(tmp_path, monkeypatch, capsys):
    assert small_evaluate_tiny(tmp_path, monkeypatch)(["--n", "4"]) == 0
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["fastv_tiny.png", "pruning_tiny.png"]
    assert not (tmp_path / "docs").exists()


def test_evaluate_tiny_anyres_prints_the_base_image_row_and_the_treatments(tmp_path, monkeypatch, capsys):
    assert small_evaluate_tiny(tmp_path, monkeypatch)(["--anyres", "--n", "4"]) == 0
    out = capsys.readouterr().out
    assert "| model, base image only (tiles blank) |" in out
    for row in ("fastv, one set", "fastv, newlines-kept", "fastv, views-apart", "random, newlines-kept+views-apart"):
        assert f"| {row} |" in out
    assert "| uniform |" not in out and "| dart |" in out


def test_evaluate_tiny_qwen_runs_the_tiny_qwen_vl_without_the_class_token_methods(tmp_path, monkeypatch, capsys):
    assert small_evaluate_tiny(tmp_path, monkeypatch)(["--qwen", "--n", "4"]) == 0
    out = capsys.readouterr().out
    assert "| model, blank image |" in out and "| 2 | 0.5 |" in out
    assert "| fastervlm |" not in out and "| visionzip |" not in out and "| dart |" in out and "| uniform |" in out
    assert "Qwen-VL's tower has no class token" in out and "Spearman" not in out


def test_numpy_is_declared_so_torch_does_not_warn_on_every_run():
    """torch prints "Failed to initialize NumPy" at each run without numpy (einops registers its torch ops,
    which imports that path): the package declares it, and a run prints no warning."""
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.startswith("numpy") for d in deps)
    result = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", "import minifastv, einops, torch; "
                             "einops.rearrange(torch.zeros(2, 3), 'a b -> b a')"], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0 and "NumPy" not in result.stderr, result.stderr


def test_batch_answers_report_the_batchs_prefill_and_their_own_decode(model_dir, tiny_pipe):
    """Each answer of a batch has the batch's prefill time and its own decode: the steps until it was
    complete (a one-word answer ends at its EOS while a longer one goes on) and the time they took."""
    from minifastv.pipeline import Pipeline

    pipe = Pipeline.load(model_dir)
    answers = pipe.answer_batch([([SAMPLES / SAMPLE["image"]], SAMPLE["question"])] * 2, max_new_tokens=3)
    assert all(a.prefill_s > 0 and a.decode_s >= 0 and a.decode_steps == 2 for a in answers)
    assert answers[0].prefill_s == answers[1].prefill_s
    trained = tiny_pipe                                            # its answers are a word, then EOS
    short, long = trained.answer_batch([([SAMPLES / SAMPLE["image"]], SAMPLE["question"]),
                                        ([SAMPLES / SAMPLE["image"]], "describe the image.")], max_new_tokens=12)
    alone = trained.answer([SAMPLES / SAMPLE["image"]], SAMPLE["question"], max_new_tokens=12)
    assert short.decode_steps == alone.decode_steps == len(short.token_ids) == 1 and short.ended
    assert long.decode_steps > short.decode_steps and long.decode_s > short.decode_s


@pytest.mark.parametrize("content,message", [
    ("", "no lines to answer"),
    ('{"prompt": "what colour is the circle?"}\n', 'expected an object with "prompt" (text) and "image"'),
    ('{"prompt": "what colour is the circle?", "image": []}\n', "a non-empty list of file names"),
    (None, "not a text file; --batch takes JSON lines"),
])
def test_batch_files_that_cannot_be_answered(model_dir, capsys, tmp_path, content, message):
    """A line without an image is an error line (not a text-only answer); every line failing is exit 1; an
    empty file, or an image given as the batch file, is a one-line error naming the file."""
    from minifastv.cli import main

    batch = tmp_path / "in.jsonl"
    if content is None:
        batch.write_bytes((SAMPLES / SAMPLE["image"]).read_bytes())          # a PNG where JSON lines belong
    else:
        batch.write_text(content)
    code = main(["generate", "--model", str(model_dir), "--batch", str(batch)])
    out, err = capsys.readouterr()
    if content:
        assert code == 1 and message in json.loads(out)["error"] and "1 of 1 lines failed" in err
    else:
        assert code == 2 and message in err and str(batch) in err and not out


@pytest.mark.parametrize("size", ["0", "-1"])
def test_a_shard_size_of_zero_or_less_is_refused(model_dir, capsys, tmp_path, size):
    from minifastv.cli import main

    assert main(["quantize", str(model_dir), str(tmp_path / "q"), "--method", "int8", "--max-shard-gb", size]) == 2
    assert f"--max-shard-gb must be above 0, got {float(size)}" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("command,usage", [(["convert_weights.py"], "usage: python convert_weights.py"),
                                           (["-m", "minifastv", "bench", "--quant", "int8"],
                                            "usage: python -m minifastv bench --quant")])
def test_help_names_the_command_that_was_run(command, usage):
    result = subprocess.run([sys.executable, *command, "--help"], capture_output=True, text=True, cwd=ROOT,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.startswith(usage), result.stdout[:200]


@pytest.mark.parametrize("budget", [6, 1], ids=["ends-at-eos", "budget-runs-out"])
def test_token_ids_follow_one_eos_convention(capsys, tmp_path, budget, tiny_pipe):
    """generate --json, generate --batch, Pipeline.answer and Pipeline.answer_batch give the same ids for the
    same question: the generated tokens without the EOS that ended them, and the text they decode to."""
    from minifastv.cli import main

    image, question = SAMPLES / SAMPLE["image"], SAMPLE["question"]
    options = ["--max-new-tokens", str(budget), "--dtype", "float32"]
    assert main(["generate", "--image", str(image), "--prompt", question, "--json", *options]) == 0
    single = json.loads(capsys.readouterr().out)
    (tmp_path / "b.jsonl").write_text(json.dumps({"image": str(image), "prompt": question}) + "\n")
    assert main(["generate", "--batch", str(tmp_path / "b.jsonl"), *options]) == 0
    batched = json.loads(capsys.readouterr().out)
    pipe = tiny_pipe
    alone = pipe.answer([image], question, max_new_tokens=budget)
    together = pipe.answer_batch([([image], question)], max_new_tokens=budget)[0]
    eos = pipe.model.config.text.eos_token_id
    assert single["token_ids"] == batched["token_ids"] == alone.token_ids == together.token_ids
    assert single["prompt_ids"] == batched["prompt_ids"] == alone.prompt_ids == together.prompt_ids
    longer = pipe.answer_batch([([image], question), ([image], "describe the image.")], max_new_tokens=1)
    assert [a.prompt_ids for a in longer] == [pipe.answer([image], q, max_new_tokens=1).prompt_ids
                                             for q in (question, "describe the image.")]        # padding left out
    assert single["text"] == batched["text"] == alone.text == together.text == SAMPLE["answer"]
    assert eos not in single["token_ids"] and len(single["token_ids"]) == 1


def test_pruning_that_changes_nothing_is_refused_or_said(model_dir, capsys, tmp_path):
    """A layer at or past the decoder's depth, asked for, is an error; as a subcommand's default (demo's FastV
    K=2 on a 2-layer decoder) it is a warning; a ratio that keeps no image token is a warning."""
    import dataclasses

    import minifastv
    import train_tiny
    from minifastv.cli import main

    code, out, err = generate_in_process(model_dir, capsys, "--prune", "fastv", "--prune-k", "4")
    assert code == 2 and "prunes nothing here: the model has 4 decoder layers" in err
    assert "--prune-k must be below 4" in err
    code, out, err = generate_in_process(model_dir, capsys, "--prune", "dart", "--prune-ratio", "0.999")
    assert code == 0 and "warning: DART K=2 R=0.999 keeps 0 of an image's 64 tokens" in err
    code, out, err = generate_in_process(model_dir, capsys, "--prune", "dart", "--prune-ratio", "0.99")
    assert code == 0 and "warning" not in err                   # round(0.01 * 64) = 1 token is still an image
    tok = train_tiny.build_tokenizer()
    model = train_tiny.build_model(tok, seed=0)
    shallow = minifastv.LlavaModel(dataclasses.replace(model.config, text=dataclasses.replace(model.config.text,
                                                                                                n_layers=2)))
    shallow.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("llm.layers.2")
                             and not k.startswith("llm.layers.3")})
    minifastv.save(shallow, tok, tmp_path / "two")
    assert main(["demo", "--model", str(tmp_path / "two")]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: FastV K=2 R=0.5 prunes nothing here: the model has 2 decoder layers") == 1


def test_json_gives_kept_patches_as_analyze_prints_them(capsys, tmp_path):
    """--json's kept_image_slots are positions in the prompt; its kept_patches are each image's row-major
    patch indices, the numbers analyze prints for the same image and method; two images, two lists."""
    from minifastv.cli import main

    image, question = SAMPLES / SAMPLE["image"], SAMPLE["question"]
    common = ["--prompt", question, "--prune", "fastv", "--prune-ratio", "0.75", "--dtype", "float32"]
    assert main(["generate", "--image", str(image), "--json", *common]) == 0
    single = json.loads(capsys.readouterr().out)
    assert main(["analyze", "--image", str(image), "--out-dir", str(tmp_path), *common]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("kept patches: "))
    assert single["kept_patches"] == [[int(p) for p in line.removeprefix("kept patches: ").split(", ")]]
    start = single["kept_image_slots"][0] - single["kept_patches"][0][0]
    assert [start + p for p in single["kept_patches"][0]] == single["kept_image_slots"]
    assert main(["generate", "--image", str(image), "--image", str(image), "--json", *common]) == 0
    double = json.loads(capsys.readouterr().out)
    assert len(double["kept_patches"]) == 2 and sum(map(len, double["kept_patches"])) == 32


def test_the_readmes_tiny_model_example_runs(capsys):
    """The Use section's lines for the shipped model, as the README prints them, answer "red"."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("# The tiny model inside the package")[1].split("```")[0]
    exec(compile("from minifastv import Pipeline\n#" + block, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip() == "red"


def test_bench_quant_says_what_it_is_doing(monkeypatch, capsys, tmp_path):
    """The full-depth run takes many minutes: each step (which checkpoint, which settings) is said on stderr
    with the time since the start. The heavy steps are stood in for here."""
    from minifastv.bench import cpu7b

    monkeypatch.setattr(cpu7b, "build_checkpoint", lambda path, config, log: log(f"built {path.name}") or path)
    monkeypatch.setattr(cpu7b, "measure_in_child", lambda *args: {})
    monkeypatch.setattr(cpu7b, "pack_for_this_cpu", lambda path, log: log(f"packed {path.name}"))
    monkeypatch.setattr(cpu7b, "float_reference", lambda args, log: {})
    monkeypatch.setattr(cpu7b, "report", lambda *args: None)
    assert cpu7b.main(["--quant", "int8", "int4", "--layers", "2", "--workdir", str(tmp_path)]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert [line.split("] ", 1)[1].split(":")[0] for line in lines if line.startswith("[")] == [
        "built int8-2layers", "int8", "int8", "built int4-2layers", "int4", "packed int4-2layers", "int4",
        "float reference", "float reference"]
    assert all(line[:1] == "[" and line.split("]")[0].endswith(" s") for line in lines)
    assert "int8: measuring off" in "\n".join(lines)


def test_bench_quant_activations_reach_the_int8_checkpoints_prefill(monkeypatch, tmp_path):
    """--activations int8 goes to the child that measures the int8 checkpoint (int4 and float stay as they are);
    --activations float int8 measures it twice."""
    from minifastv.bench import cpu7b
    from minifastv.checkpoint import quantize_checkpoint
    from minifastv.config import QuantConfig
    from minifastv.data import TINY_MODEL

    quantize_checkpoint(TINY_MODEL, tmp_path / "q8", QuantConfig("int8"))
    import types

    children = []
    monkeypatch.setattr(cpu7b, "build_checkpoint", lambda path, config, log: path)
    monkeypatch.setattr(cpu7b, "warm_page_cache", lambda path: None)
    monkeypatch.setattr(cpu7b.subprocess, "run", lambda cmd, **kw: children.append(cmd) or types.SimpleNamespace(
        stdout="{}"))
    monkeypatch.setattr(cpu7b, "float_reference", lambda args, log: {})
    monkeypatch.setattr(cpu7b, "report", lambda *args: None)
    cpu7b.main(["--quant", "int8", "--layers", "2", "--workdir", str(tmp_path), "--activations", "int8"])
    assert [cmd[cmd.index("--activations") + 1] for cmd in children] == ["int8"]
    children.clear()
    cpu7b.main(["--quant", "int8", "--layers", "2", "--workdir", str(tmp_path), "--activations", "float", "int8"])
    assert [cmd[cmd.index("--activations") + 1] for cmd in children] == ["float", "int8"]
    children.clear()
    monkeypatch.setattr(cpu7b, "int8_gemm_exact", lambda: False)           # AVX2 without VNNI: refused up front
    with pytest.raises(ValueError, match="--activations int8: not available on this CPU"):
        cpu7b.main(["--quant", "int8", "--layers", "2", "--workdir", str(tmp_path), "--activations", "int8"])
    assert not children
    seen = []
    monkeypatch.setattr(cpu7b, "set_activations", lambda model, kind: seen.append(kind))
    cpu7b.measure(tmp_path / "q8", ["off"], 1, 2, 1, "float32", "int8")
    cpu7b.measure(tmp_path / "q8", ["off"], 1, 2, 1, "float32", "float")
    cpu7b.measure(TINY_MODEL, ["off"], 1, 2, 1, "float32", "int8")          # a float checkpoint: weight-only
    assert seen == ["int8"]
    real_load = cpu7b.load

    def probing_load(path, dtype):   # a first load on a machine: half a second probing the kernels
        model = real_load(path, dtype=dtype)
        time.sleep(0.5)
        model.kernel_choice.probe_s = 0.5
        return model

    monkeypatch.setattr(cpu7b, "load", probing_load)
    got = cpu7b.measure(tmp_path / "q8", ["off"], 1, 2, 1, "float32", "float")
    assert got["load_s"] < 0.4 and got["kernels"].startswith("kernels (int8): decode weight_int8pack_mm, ")


def test_bench_quant_kv_cache_reaches_every_checkpoints_child(monkeypatch, capsys, tmp_path):
    """--kv-cache float int8 measures each checkpoint with each cache (beside --activations), and the child sets it:
    its decode steps run the int8 cache's attention."""
    import types

    from minifastv.bench import cpu7b
    from minifastv.data import TINY_MODEL
    from minifastv.models.cache_int8 import Int8LayerCache

    children = []
    monkeypatch.setattr(cpu7b, "build_checkpoint", lambda path, config, log: path)
    monkeypatch.setattr(cpu7b, "warm_page_cache", lambda path: None)
    monkeypatch.setattr(cpu7b, "pack_for_this_cpu", lambda path, log: None)
    monkeypatch.setattr(cpu7b.subprocess, "run", lambda cmd, **kw: children.append(cmd) or types.SimpleNamespace(
        stdout="{}"))
    monkeypatch.setattr(cpu7b, "float_reference", lambda args, log: {})
    monkeypatch.setattr(cpu7b, "report", lambda args, results, *rest: children.append(sorted(results)))
    cpu7b.main(["--quant", "int8", "int4", "--layers", "2", "--workdir", str(tmp_path), "--activations", "float",
                "int8", "--kv-cache", "float", "int8"])
    assert [(cmd[cmd.index("--activations") + 1], cmd[cmd.index("--kv-cache") + 1]) for cmd in children[:-1]] == [
        ("float", "float"), ("float", "int8"), ("int8", "float"), ("int8", "int8"), ("float", "float"),
        ("float", "int8")]
    assert children[-1] == ["int4", "int4 + int8 KV cache", "int8", "int8 + int8 KV cache",
                            "int8 + int8 activations", "int8 + int8 activations + int8 KV cache"]
    attended = []
    monkeypatch.setattr(Int8LayerCache, "attend_one", lambda self, *a, real=Int8LayerCache.attend_one: attended.append(
        1) or real(self, *a))
    made = []
    real_set = cpu7b.set_kv_cache
    monkeypatch.setattr(cpu7b, "set_kv_cache", lambda model, kind: made.append(kind) or real_set(model, kind))
    cpu7b.measure(TINY_MODEL, ["off"], 1, 3, 1, "float32", "float", "int8")
    assert made == ["int8"] and attended                          # decode steps: the int8 cache's own attention
    attended.clear()
    cpu7b.measure(TINY_MODEL, ["off"], 1, 3, 1, "float32", "float", "float")
    assert made == ["int8", "float"] and not attended


def test_bench_quant_packs_int4_once_and_reports_ratios_to_llama_cpp(capsys, tmp_path):
    """The int4 checkpoint gets its packed file before it is measured (and keeps a fresh one); the report divides
    each configuration's TTFT by llama.cpp's prompt time and its decode speed by llama.cpp's."""
    import argparse

    from minifastv.bench import cpu7b
    from minifastv.checkpoint import quantize_checkpoint
    from minifastv.config import QuantConfig
    from minifastv.data import TINY_MODEL
    from minifastv.quant.linear import cpu_int4_block

    path = quantize_checkpoint(TINY_MODEL, tmp_path / "q4", QuantConfig("int4", 32))
    cpu7b.pack_for_this_cpu(path, print)
    packed = list(path.glob("cpu-int4-b*.safetensors"))
    assert len(packed) == (cpu_int4_block() is not None)
    if packed:
        mtime = packed[0].stat().st_mtime_ns
        cpu7b.pack_for_this_cpu(path, print)
        assert packed[0].stat().st_mtime_ns == mtime                       # fresh: not written again
    capsys.readouterr()
    setting = {"kept": 288, "first_ttft_s": 9.0, "ttft_s": 6.32, "ttft_spread_s": 0.1, "decode_tok_s": 3.0,
               "attention_s": 1.08}
    run = {"dtype": "bfloat16", "load_s": 2.0, "peak_rss": 8 << 30, "vision_s": 2.0,
           "kernels": "kernels (int8): decode K1, prefill K2; probed", "settings": {"off": dict(setting, ttft_s=12.64), "K=2 R=0.5": setting}}
    peer = {"build": "test", "runs": {"Q8_0": {"pp_tok_s": 50.0, "tg_tok_s": 6.0, "peak_rss": 7 << 30}}}
    args = argparse.Namespace(layers=32, ref_layers=4, decode_tokens=16, repeats=2)
    cpu7b.report(args, {"int8": run, "int8 + int8 activations": run}, {"x": {"vision_s": 2.0, "dtype": "float32",
                                                                              "settings": {}}}, peer)
    out = capsys.readouterr().out
    # vs off; the answer: 6.32 s + 32 tokens at 3 a second; attention: 1.08 s of the prefill's 6.32 - 2.0 s
    assert "| int8 | bfloat16 | K=2 R=0.5 | 288 | 2.0 | 9.0 | 6.3 (0.1) | 2.00x | 3.00 | 17.0 | 25% | 8.00 |" in out
    assert "| int8 | bfloat16 | off | 288 | 2.0 | 9.0 | 12.6 (0.1) | 1.00x | 3.00 | 23.3 | 10% | 8.00 |" in out
    assert "| Q8_0 | 12.6 | 6.00 | 18.0 | 7.00 |" in out                       # 632 / 50 s + 32 tokens at 6 a second
    assert ("minifastv int8 / llama.cpp Q8_0: TTFT / prompt time off 1.00x, K=2 R=0.5 0.50x; decode speed 0.50x, "
            "0.50x; answer time (first token + 32 tokens; llama.cpp without a vision tower) 1.30x, 0.95x") in out
    assert "minifastv int8 + int8 activations / llama.cpp Q8_0: TTFT" in out
    assert "| int8 + int8 activations | bfloat16 | K=2 R=0.5 | 288 |" in out
    assert "\nint8: kernels (int8): decode K1, prefill K2; probed\n" in out          # which matmuls ran


def test_bench_quant_video_llava_shape(monkeypatch, capsys, tmp_path):
    """--family video-llava: Video-LLaVA-7B's shape with one 8-frame video (2,056 video tokens in a prompt of
    2,112), its own checkpoints, measured through the video tower and the video placeholder, and a report that
    gives the prompt's length, llama.cpp's time at that length and FastV's FLOPs at 632 and at 2,112 tokens."""
    import argparse

    import minifastv
    import train_tiny
    from minifastv.bench import cpu7b
    from minifastv.models.video_llava import VIDEO_LLAVA_7B

    config = cpu7b.bench_config(2, None, "video-llava")
    assert config == dataclasses.replace(VIDEO_LLAVA_7B, text=dataclasses.replace(VIDEO_LLAVA_7B.text, n_layers=2))
    ids, visual = cpu7b.random_prompt(config)
    assert ids[0].tolist().count(config.video_token_id) == 1 and list(visual) == ["video_values"]
    assert list(visual["video_values"].shape) == [1, 8, 3, 224, 224]
    assert cpu7b.prompt_tokens("video-llava") == 2112 and cpu7b.prompt_tokens("llava") == 632
    built = []
    monkeypatch.setattr(cpu7b, "build_checkpoint", lambda path, config, log: built.append((path.name, config)) or path)
    monkeypatch.setattr(cpu7b, "measure_in_child", lambda *args: {})
    monkeypatch.setattr(cpu7b, "pack_for_this_cpu", lambda path, log: None)
    monkeypatch.setattr(cpu7b, "report", lambda *args: None)
    monkeypatch.setattr(cpu7b, "measure_in_child", lambda *args, **kw: {})
    assert cpu7b.main(["--quant", "int8", "--family", "video-llava", "--layers", "2", "--ref-layers", "1",
                       "--workdir", str(tmp_path)]) == 0
    assert [name for name, _ in built] == ["video-llava-int8-2layers", "video-llava-float-1layers"]
    assert all(c.family == "video-llava" for _, c in built)
    # The measurement itself, on a tiny video model: the vision time is the video tower's, FastV keeps half.
    tok = train_tiny.build_tokenizer("video")
    minifastv.save(train_tiny.build_model(tok, seed=0, task="video"), tok, tmp_path / "v")
    got = cpu7b.measure(tmp_path / "v", ["off", "K=2 R=0.5"], 1, 2, 1, "float32")
    assert got["prompt_tokens"] == 56 + 136 and got["settings"]["K=2 R=0.5"]["kept"] == 68
    for setting in got["settings"].values():   # the decoder's attention, timed in the first run's prefill (not
        assert 0 < setting["attention_s"] < setting["first_ttft_s"]  # less vision_s: timed apart, it can exceed it)
    import torch.nn.functional

    assert cpu7b.llama.F is torch.nn.functional                       # and the decoder's own F is back
    setting = {"kept": 1028, "first_ttft_s": 90.0, "ttft_s": 60.0, "ttft_spread_s": 1.0, "decode_tok_s": 3.0,
               "attention_s": 1.08}
    run = {"dtype": "float32", "load_s": 2.0, "peak_rss": 8 << 30, "vision_s": 2.0,
           "kernels": "kernels (int8): decode K1, prefill K2; probed",
           "settings": {"off": dict(setting, ttft_s=120.0), "K=2 R=0.5": setting}}
    peer = {"build": "test", "runs": {"Q8_0": {"pp_tok_s": 21.12, "tg_tok_s": 6.0, "peak_rss": 7 << 30}}}
    args = argparse.Namespace(layers=32, ref_layers=4, decode_tokens=16, repeats=2, family="video-llava")
    monkeypatch.undo()
    cpu7b.report(args, {"int8": run}, {"x": {"vision_s": 2.0, "dtype": "float32", "settings": {}}}, peer)
    out = capsys.readouterr().out
    assert "Video-LLaVA-7B shape, 32 decoder layers, random weights; prompt 2112 tokens (2056 video)" in out
    assert "| Q8_0 | 100.0 | 6.00 | 105.3 | 7.00 |" in out and "prompt 2112 tokens s" in out
    assert "632 tokens (576 visual): K=2 R=0.5 56.5%" in out and "2112 tokens (2056 visual): K=2 R=0.5 52.0%" in out
    assert "measured TTFT saved at 2112 tokens, int8: K=2 R=0.5 50%" in out
    assert "minifastv int8 / llama.cpp Q8_0: TTFT / prompt time off 1.20x, K=2 R=0.5 0.60x" in out


def test_bench_quant_13b_and_llava_next_shapes(monkeypatch, capsys, tmp_path):
    """--size 13b: LLaVA-1.5-13B's decoder (40 layers by default, 5120 wide) with its FastV FLOPs cut printed
    beside the paper's 45%; --family llava-next: one 672 x 672 image (2,928 image tokens in 2,984), measured
    with a fourth setting that keeps 320 of them; Video-LLaVA has no 13B, refused before anything is built."""
    import argparse

    from minifastv.bench import cpu7b
    from minifastv.models.llava_next import LlavaNextConfig

    built, children = [], []
    monkeypatch.setattr(cpu7b, "build_checkpoint", lambda path, config, log: built.append((path.name, config)) or path)
    monkeypatch.setattr(cpu7b, "measure_in_child", lambda path, settings, *a: children.append(settings) or {})
    monkeypatch.setattr(cpu7b, "pack_for_this_cpu", lambda path, log: None)
    monkeypatch.setattr(cpu7b, "report", lambda *args: None)
    assert cpu7b.main(["--quant", "int4", "--size", "13b", "--ref-layers", "1", "--workdir", str(tmp_path)]) == 0
    assert [name for name, _ in built] == ["13b-int4-40layers", "13b-float-1layers"]
    assert (built[0][1].text.dim, built[0][1].text.n_layers, built[0][1].text.intermediate_size) == (5120, 40, 13824)
    assert children[0] == ["off", "K=2 R=0.5", "K=2 R=0.75"]
    built.clear(), children.clear()
    assert cpu7b.main(["--quant", "int8", "--family", "llava-next", "--layers", "2", "--ref-layers", "1",
                       "--workdir", str(tmp_path)]) == 0
    assert [name for name, _ in built] == ["llava-next-int8-2layers", "llava-next-float-1layers"]
    assert all(isinstance(c, LlavaNextConfig) and c.text.dim == 4096 for _, c in built)
    assert children[0] == ["off", "K=2 R=0.5", "K=2 R=0.75", "K=2 320 kept"]
    built.clear()
    with pytest.raises(ValueError, match="--size 13b: Video-LLaVA has a 7B model only"):
        cpu7b.main(["--quant", "int8", "--family", "video-llava", "--size", "13b", "--workdir", str(tmp_path)])
    assert not built
    config = cpu7b.bench_config(1, None, "llava-next")
    ids, visual = cpu7b.random_prompt(config)
    assert ids.shape[1] == 2984 and (ids == config.image_token_id).sum() == 2928 and cpu7b.prompt_tokens("llava-next", "13b") == 2984
    assert list(visual["pixel_values"].shape) == [5, 3, 336, 336] and visual["image_sizes"].tolist() == [[672, 672]]
    monkeypatch.undo()
    setting = {"kept": 320, "first_ttft_s": 9.0, "ttft_s": 6.0, "ttft_spread_s": 0.1, "decode_tok_s": 3.0,
               "attention_s": 1.08}
    run = {"dtype": "bfloat16", "load_s": 2.0, "peak_rss": 8 << 30, "vision_s": 2.0,
           "kernels": "kernels (int8): decode K1, prefill K2; probed", "settings": {"off": dict(setting, kept=2928),
                                                                                "K=2 320 kept": setting}}
    reference = {"x": {"vision_s": 2.0, "dtype": "float32", "settings": {}}}
    args = argparse.Namespace(layers=32, ref_layers=4, decode_tokens=16, repeats=2, family="llava-next", size="7b")
    cpu7b.report(args, {"int8": run}, reference, None)
    out = capsys.readouterr().out
    assert "LLaVA-NeXT-7B shape, 32 decoder layers, random weights; prompt 2984 tokens (2928 image)" in out
    assert "| int8 | bfloat16 | K=2 320 kept | 320 |" in out and "a base image and 4 tiles" in out
    assert "2984 tokens (2928 visual): K=2 R=0.5 50.9%, K=2 R=0.75 28.6%, K=2 320 kept 16.7%" in out
    args = argparse.Namespace(**dict(vars(args), family="llava", size="13b", layers=40))
    cpu7b.report(args, {"int8": run}, reference, None)
    out = capsys.readouterr().out
    assert "LLaVA-1.5-13B shape, 40 decoder layers" in out and "13B, relative to off: 632 tokens" in out
    assert ("FastV K=2 R=0.5 cuts LLaVA-1.5-13B's prefill FLOPs (40 layers) by 43.9% at this 632-token prompt, 45.0% "
            "at 616 tokens (the paper: 45%)") in out
    assert "2112 tokens" not in out                                    # no Video-LLaVA line at 13B


def test_bench_quant_measures_the_settings_asked_for_and_no_reference_at_ref_layers_0(monkeypatch, capsys, tmp_path):
    """--settings picks the FastV settings (off always among them, first; the family's own order), a setting the
    family does not have is refused before anything is built; --ref-layers 0 builds and measures no float model,
    and the report then takes the vision tower's time from the quantized runs."""
    from minifastv.bench import cpu7b

    built, children = [], []
    monkeypatch.setattr(cpu7b, "build_checkpoint", lambda path, config, log: built.append(path.name) or path)
    monkeypatch.setattr(cpu7b, "pack_for_this_cpu", lambda path, log: None)
    setting = {"kept": 1464, "first_ttft_s": 9.0, "ttft_s": 6.0, "ttft_spread_s": 0.1, "decode_tok_s": 3.0,
               "attention_s": 1.0}
    monkeypatch.setattr(cpu7b, "measure_in_child", lambda path, settings, *a: children.append(settings) or {
        "dtype": "bfloat16", "load_s": 1.0, "peak_rss": 1 << 30, "vision_s": 1.25, "kernels": "k",
        "settings": {name: setting for name in settings}})
    argv = ["--quant", "int8", "--family", "llava-next", "--layers", "2", "--workdir", str(tmp_path)]
    assert cpu7b.main([*argv, "--settings", "K=2 320 kept", "K=2 R=0.5", "--ref-layers", "0"]) == 0
    assert built == ["llava-next-int8-2layers"] and children == [["off", "K=2 R=0.5", "K=2 320 kept"]]
    out = capsys.readouterr().out
    assert "float," not in out and "alone: 1.25 s in bfloat16" in out
    assert "--settings 'K=2 320 kept' 'K=2 R=0.5' --ref-layers 0\n" in out          # the command, as typed again
    assert "| int8 | bfloat16 | K=2 320 kept | 1464 |" in out and "K=2 R=0.75 |" not in out
    built.clear(), children.clear()
    assert cpu7b.main([*argv, "--settings", "off", "--ref-layers", "1"]) == 0
    assert built == ["llava-next-int8-2layers", "llava-next-float-1layers"]
    assert children[0] == ["off"] and len(children) > 1     # the reference: fp32, and bf16 where auto picks it
    assert all(settings == ["off", "K=2 R=0.5"] for settings in children[1:])
    built.clear()
    with pytest.raises(ValueError, match="--settings K=2 320 kept: not a setting of --family llava "):
        cpu7b.main(["--quant", "int8", "--workdir", str(tmp_path), "--settings", "K=2 320 kept"])
    assert not built


def test_bench_quant_qwen_vl_shape(monkeypatch, capsys, tmp_path):
    """--family qwen-vl: Qwen-VL-Chat-7B's shape (the 48-block tower at 448 px, the resampler, Qwen-7B with its
    151,936-word vocabulary), one image's 256 tokens between <img> and </img> in 314; llama.cpp's anchor is a GGUF
    of the same vocabulary; no 13B; and the measurement itself on the tiny Qwen-VL."""
    import argparse

    from minifastv.bench import cpu7b
    from minifastv.data import TINY_QWEN_MODEL
    from minifastv.models.qwen_vl import QwenVLConfig

    built, children, peers = [], [], []
    monkeypatch.setattr(cpu7b, "build_checkpoint", lambda path, config, log: built.append((path.name, config)) or path)
    monkeypatch.setattr(cpu7b, "measure_in_child", lambda path, settings, *a: children.append(settings) or {})
    monkeypatch.setattr(cpu7b, "report", lambda *args: None)
    monkeypatch.setattr(cpu7b, "run_peer", lambda workdir, text, *a, **kw: peers.append((
        text.vocab_size, a[-1], kw["name"], kw["types"])) or {})
    monkeypatch.setattr(cpu7b, "find_tool", lambda name, bin_dir: tmp_path / name)
    assert cpu7b.main(["--quant", "int8", "--family", "qwen-vl", "--layers", "2", "--ref-layers", "1",
                       "--workdir", str(tmp_path), "--peer", "llama.cpp"]) == 0
    assert [name for name, _ in built] == ["qwen-vl-int8-2layers", "qwen-vl-float-1layers"]
    assert all(isinstance(c, QwenVLConfig) and (c.text.vocab_size, c.vision.n_layers) == (151936, 48) for _, c in built)
    assert children[0] == ["off", "K=2 R=0.5", "K=2 R=0.75"]
    assert peers == [(151936, 314, "llama7b-vocab151936", ("Q8_0",))]       # only the type int8 is compared with
    with pytest.raises(ValueError, match="--size 13b: Qwen-VL-Chat has a 7B model only"):
        cpu7b.main(["--quant", "int8", "--family", "qwen-vl", "--size", "13b", "--workdir", str(tmp_path)])
    config = cpu7b.bench_config(1, None, "qwen-vl")
    ids = cpu7b.random_prompt(config)[0][0].tolist()
    at = ids.index(config.image_token_id)
    assert ids[at - 1:at + 2] == [config.image_start_id, config.image_token_id, config.image_end_id]
    assert cpu7b.prompt_tokens("qwen-vl") == 314 == len(ids) - 1 + 256
    monkeypatch.undo()
    setting = {"kept": 128, "first_ttft_s": 9.0, "ttft_s": 6.0, "ttft_spread_s": 0.1, "decode_tok_s": 3.0,
               "attention_s": 1.08}
    run = {"dtype": "bfloat16", "load_s": 2.0, "peak_rss": 8 << 30, "vision_s": 2.0,
           "kernels": "kernels (int8): decode K1, prefill K2; probed", "settings": {"off": dict(setting, kept=256),
                                                                                "K=2 R=0.5": setting}}
    args = argparse.Namespace(layers=32, ref_layers=4, decode_tokens=16, repeats=2, family="qwen-vl", size="7b")
    cpu7b.report(args, {"int8": run}, {"x": {"vision_s": 2.0, "dtype": "float32", "settings": {}}}, None)
    out = capsys.readouterr().out
    assert "Qwen-VL-Chat-7B shape, 32 decoder layers, random weights; prompt 314 tokens (256 image)" in out
    assert "ViT-bigG-style at 448 px, 48 blocks, and the resampler" in out
    assert "314 tokens (256 visual): K=2 R=0.5" in out
    got = cpu7b.measure(TINY_QWEN_MODEL, ["off", "K=2 R=0.5", "K=2 R=0.75"], 1, 2, 1, "float32")
    assert got["prompt_tokens"] == 58 + 16 and [s["kept"] for s in got["settings"].values()] == [16, 8, 4]
    import dataclasses

    from minifastv.config import QuantConfig

    tiny = dataclasses.replace(QwenVLConfig.from_name("tiny-qwen"), quant=QuantConfig("int8"))
    built = cpu7b.measure(cpu7b.build_checkpoint(tmp_path / "q8", tiny, lambda _: None), ["off"], 1, 2, 1, "bfloat16")
    assert built["prompt_tokens"] == 58 + 16     # the sin-cos table is written in float32, as the loader expects


def test_the_peer_decoder_has_the_models_vocabulary_and_only_its_quantized_files_stay(tmp_path, monkeypatch):
    """bench --peer's GGUF has the benchmarked model's vocabulary (Qwen-VL's 151,936 words cost llama.cpp as they
    cost minifastv), and its F16 file, 13-15 GB at 7B, is removed once llama-quantize made Q8_0 and Q4_0 from it;
    a second run uses those. llama-quantize and llama-bench are stand-ins here."""
    import gguf

    from minifastv.bench import llama_cpp
    from minifastv.config import TextConfig

    tools = tmp_path / "bin"
    tools.mkdir()
    tools.joinpath("llama-quantize").write_text(f"#!{sys.executable}\nimport shutil, sys\n"
                                                "shutil.copyfile(sys.argv[1], sys.argv[2])\n")
    # the stand-in answers as llama-bench does: one record for the prompt (-p 10 -n 0), one for decoding after it
    # (-p 0 -n 4 -d 10: at the prompt's depth), and says how it was called
    calls_file = str(tmp_path / "calls")
    tools.joinpath("llama-bench").write_text(
        f"#!{sys.executable}\nimport json, sys\na = sys.argv[1:]\n"
        f"open({calls_file!r}, 'a').write(' '.join(a) + '\\n')\n"
        "p, n = int(a[a.index('-p') + 1]), int(a[a.index('-n') + 1])\n"
        "print(json.dumps([{'n_prompt': p, 'n_gen': n, 'n_depth': int(a[a.index('-d') + 1]) if '-d' in a else 0, "
        "'avg_ts': 50.0 if p else 5.0, 'stddev_ts': 1.0}]))\n")
    for tool in tools.iterdir():
        tool.chmod(0o755)
    text = TextConfig(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=96)
    work = tmp_path / "work"
    got = llama_cpp.run_peer(work, text, 1, 4, str(tools), lambda _: None, prompt=10, name="tiny")
    assert got["runs"]["Q8_0"]["pp_tok_s"] == 50.0 and got["runs"]["Q4_0"]["tg_tok_s"] == 5.0
    calls = [line.split() for line in (tmp_path / "calls").read_text().splitlines()]
    assert [(c[c.index("-p") + 1], c[c.index("-n") + 1], c[c.index("-d") + 1] if "-d" in c else None)
            for c in calls] == [("10", "0", None), ("0", "4", "10")] * 2      # decode after the prompt; Q8_0, Q4_0
    assert sorted(p.name for p in work.iterdir()) == ["tiny-2layers-Q4_0.gguf", "tiny-2layers-Q8_0.gguf"]
    tensors = {t.name: t for t in gguf.GGUFReader(work / "tiny-2layers-Q8_0.gguf").tensors}
    assert sorted(tensors["token_embd.weight"].shape) == sorted(tensors["output.weight"].shape) == [64, 300]
    monkeypatch.setattr(llama_cpp, "write_gguf", lambda *a: pytest.fail("the quantized files are there"))
    assert llama_cpp.run_peer(work, text, 1, 4, str(tools), lambda _: None, prompt=10, name="tiny")["runs"]
    monkeypatch.undo()
    (tmp_path / "calls").unlink()                      # types: only those asked for are made and timed
    got = llama_cpp.run_peer(tmp_path / "w2", text, 1, 4, str(tools), lambda _: None, prompt=10, types=("Q4_0",))
    assert list(got["runs"]) == ["Q4_0"] and len((tmp_path / "calls").read_text().splitlines()) == 2
    assert [p.name for p in (tmp_path / "w2").iterdir()] == ["llama7b-2layers-Q4_0.gguf"]


@pytest.mark.parametrize("bench_body, said", [
    ("import sys\nsys.stderr.write('loading model\\nerror: failed to load model x.gguf\\n')\nsys.exit(1)",
     "llama-bench failed (exit status 1): loading model | error: failed to load model x.gguf"),
    ("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)", "llama-bench failed (killed by SIGSEGV)"),
    ("print('no json here')", "llama-bench printed no JSON results: 'no json here'")])
def test_a_failing_peer_is_one_line_and_the_figures_are_still_printed(tmp_path, monkeypatch, capsys, bench_body,
                                                                      said):
    """llama-bench's own stderr and exit status (a signal by name: the AMX build's SIGSEGV) in one line, after
    minifastv's report; a missing tool is said before anything is measured."""
    from minifastv.bench import cpu7b

    tools = tmp_path / "bin"
    tools.mkdir()
    tools.joinpath("llama-quantize").write_text(f"#!{sys.executable}\nimport shutil, sys\n"
                                                "shutil.copyfile(sys.argv[1], sys.argv[2])\n")
    tools.joinpath("llama-bench").write_text(f"#!{sys.executable}\n{bench_body}\n")
    for tool in tools.iterdir():
        tool.chmod(0o755)
    reported, measured = [], []
    monkeypatch.setattr(cpu7b, "build_checkpoint", lambda path, config, log: path)
    monkeypatch.setattr(cpu7b, "measure_in_child", lambda *a: measured.append(a) or {})
    monkeypatch.setattr(cpu7b, "report", lambda args, results, reference, peer: reported.append(peer))
    monkeypatch.setattr(cpu7b, "bench_config", lambda *a: cpu7b.LlavaConfig.from_name("tiny"))
    argv = ["--quant", "int8", "--layers", "2", "--ref-layers", "1", "--workdir", str(tmp_path / "w"), "--peer",
            "llama.cpp", "--peer-bin", str(tools)]
    assert cpu7b.main(argv) == 1 and reported == [None]
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: --peer llama.cpp: {said}"]
    tools.joinpath("llama-quantize").unlink()
    measured.clear()
    with pytest.raises(FileNotFoundError, match=f"llama-quantize: not found in {tools}"):
        cpu7b.main(argv)
    assert measured == []


def test_the_prune_ratio_help_says_what_each_method_keeps_and_it_is_so(tiny_pipe, capsys):
    from minifastv.cli import main
    from minifastv.pruning import make

    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    said = " ".join(capsys.readouterr().out.split())
    for method, kept in (("fastv", 32), ("pyramiddrop", 8), ("pyramiddrop-official", 8), ("dart-official", 36)):
        assert f"{kept} of 64 at 0.5" in said
        answer = tiny_pipe.answer([SAMPLES / SAMPLE["image"]], SAMPLE["question"], prune=make(method, 0.5),
                                  max_new_tokens=1)
        assert answer.kept == kept, method


def test_repeats_that_disagree_by_more_than_2x_are_warned_about():
    from minifastv.bench.machine import spread_warning

    assert spread_warning("x", [0.010, 0.019, 0.020]) is None
    assert spread_warning("the prefill", [0.010, 0.021]) == (
        "warning: the repeats of the prefill disagree by 2.1x (10.0 to 21.0 ms): the box is busy, so its figures are "
        "unreliable")


@pytest.mark.parametrize("flags, message", [(["--repeats", "0"], "--repeats must be at least 1, got 0"),
                                            (["--decode-tokens", "1"], "--decode-tokens must be at least 2, got 1"),
                                            (["--threads", "0"], "--threads must be at least 1"),
                                            (["--layers", "0"], "--layers must be at least 1"),
                                            (["--ref-layers", "-1"], "--ref-layers must be at least 0")])
def test_bench_quant_refuses_settings_it_cannot_measure(flags, message, tmp_path):
    from minifastv.bench import cpu7b

    with pytest.raises(ValueError, match=message):
        cpu7b.main(["--quant", "int8", "--workdir", str(tmp_path), *flags])
    assert not any(tmp_path.iterdir())                                       # refused before anything is built


def test_bench_quant_times_the_first_token_and_the_decode_apart(monkeypatch):
    """A clock that ticks one second per reading: the first token at 1 s, then one token a second, so TTFT is
    1 s and the decode speed 1 token/s (the first token, the prefill's, is not a decoded one)."""
    import itertools
    import types

    from minifastv.bench import cpu7b
    from minifastv.data import TINY_MODEL

    def fake_stream(model, ids, **kwargs):
        class Run:
            prefill = types.SimpleNamespace(kept_image_slots=lambda: [list(range(64))])

            def __iter__(self):
                return iter(range(kwargs["max_new_tokens"]))
        return Run()

    clock = itertools.count()
    monkeypatch.setattr(cpu7b, "stream", fake_stream)
    monkeypatch.setattr(cpu7b.time, "perf_counter", lambda: float(next(clock)))
    got = cpu7b.measure(TINY_MODEL, ["off"], 2, 5, 1, "float32")["settings"]["off"]
    assert (got["ttft_s"], got["first_ttft_s"], got["ttft_spread_s"], got["decode_tok_s"]) == (1.0, 1.0, 0.0, 1.0)


def test_bench_timing_counts_only_decoded_tokens_in_the_decode_rate(monkeypatch):
    """The clock ticks one second per reading: each of the 5 tokens comes a second after the one before, so the
    first (the prefill's) at 1 s and the 4 decoded ones at 1 token/s."""
    import itertools

    from minifastv.bench import timing

    clock = itertools.count()
    monkeypatch.setattr(timing.time, "perf_counter", lambda: float(next(clock)))

    def generate(on_token):
        for _ in range(5):
            on_token()
    got = timing.timed(generate, 3)
    assert (got.prefill_s, got.decode_tok_s, got.tokens, got.runs, got.prefills) == (1.0, 1.0, 5, 3, (1.0,) * 3)
    assert timing.spread_ms([0.010, 0.0125, 0.011]) == "2.5" and timing.spread_ms([0.01]) == "-"


def test_batch_file_names_are_read_from_the_batch_files_folder(model_dir, capsys, tmp_path, monkeypatch):
    import shutil

    from minifastv.cli import main

    folder = tmp_path / "batches"
    folder.mkdir()
    shutil.copy(SAMPLES / SAMPLE["image"], folder / "picture.png")
    shutil.copy(SAMPLES / SAMPLE["image"], tmp_path / "here.png")                 # beside the command, not the file
    (folder / "in.jsonl").write_text(json.dumps({"image": "picture.png", "prompt": SAMPLE["question"]}) + "\n" +
                                     json.dumps({"image": "here.png", "prompt": SAMPLE["question"]}) + "\n")
    monkeypatch.chdir(tmp_path)
    code = main(["generate", "--model", str(model_dir), "--batch", "batches/in.jsonl", "--max-new-tokens", "1"])
    first, second = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert code == 1 and "error" not in first and "batches/here.png" in second["error"]


def test_every_pruning_method_is_exported_by_its_class_name():
    import minifastv

    assert all(getattr(minifastv, cls.__name__) is cls for cls in minifastv.METHODS.values())
    assert {cls.__name__ for cls in minifastv.METHODS.values()} <= set(minifastv.__all__)
