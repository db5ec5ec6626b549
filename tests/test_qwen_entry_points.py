"""Qwen-VL at every entry point (generate, --batch lines, chat, analyze, demo, the server), on the shipped tiny
Qwen-VL (minifastv/data/tiny_qwen), in process or as a subprocess: each answer is the library's own answer to
the same question, and the kept tokens are reported on the resampler's grid of queries, not on the patches."""

import io
import json

import pytest
from PIL import Image
from serving import SAMPLE, image_message

from minifastv import Chat, FastV
from minifastv.data import SAMPLES, TINY_QWEN_MODEL
from minifastv.pipeline import Pipeline

IMAGE, QUESTION, ANSWER = SAMPLES / SAMPLE[0]["image"], SAMPLE[0]["question"], SAMPLE[0]["answer"]


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.load(TINY_QWEN_MODEL, dtype="float32")


def cli(capsys, *args):
    from minifastv.cli import main

    code = main([*map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_json_reports_the_tokens_on_the_queries_grid(pipe, capsys):
    code, out, err = cli(capsys, "generate", "--model", TINY_QWEN_MODEL, "--image", IMAGE, "--prompt", QUESTION,
                         "--json", "--prune", "fastv", "--dtype", "float32")
    assert code == 0, err
    got = json.loads(out)
    alone = pipe.answer([IMAGE], QUESTION, prune=FastV(2, 0.5))
    cfg = pipe.model.config
    assert got["text"] == alone.text == ANSWER and got["token_ids"] == alone.token_ids
    assert got["n_image_tokens"] == cfg.n_queries == 16 and got["kept_image_tokens"] == 8
    assert got["kept_patches"] == alone.kept_patches and all(0 <= i < 16 for i in got["kept_patches"][0])
    ids = got["prompt_ids"]
    assert ids[ids.index(cfg.image_token_id) - 1] == cfg.image_start_id and ids.count(cfg.image_token_id) == 1
    assert ids[ids.index(cfg.image_token_id) + 1] == cfg.image_end_id
    code, out, err = cli(capsys, "generate", "--model", TINY_QWEN_MODEL, "--image", IMAGE, "--prompt", QUESTION,
                         "--prune", "fastv", "--prune-ratio", "0.99", "--dtype", "float32")
    assert code == 0 and "warning: FastV K=2 R=0.99 keeps 0 of an image's 16 tokens" in err, err


def test_batch_lines_answer_as_each_question_alone(pipe, capsys, tmp_path):
    lines = [{"image": str(SAMPLES / s["image"]), "prompt": s["question"]} for s in SAMPLE]
    lines.append({"image": [str(IMAGE), str(SAMPLES / SAMPLE[1]["image"])], "prompt": QUESTION})
    batch = tmp_path / "in.jsonl"
    batch.write_text("\n".join(map(json.dumps, lines)) + "\n")
    code, out, err = cli(capsys, "generate", "--model", TINY_QWEN_MODEL, "--batch", batch, "--batch-size", 3,
                         "--prune", "dart", "--prune-ratio", "0.75", "--dtype", "float32")
    assert code == 0, err
    results = [json.loads(line) for line in out.splitlines()]
    from minifastv.pruning import make

    for line, r in zip(lines, results, strict=True):
        images = line["image"] if isinstance(line["image"], list) else [line["image"]]
        alone = pipe.answer(images, line["prompt"], prune=make("dart", 0.75))
        assert r["token_ids"] == alone.token_ids and r["kept_image_slots"] == alone.kept_image_slots
    assert results[-1]["n_image_tokens"] == 32 and len(results[-1]["kept_patches"]) == 2


def test_chat_keeps_the_image_for_later_questions_in_the_library_and_on_the_command_line(pipe, capsys, monkeypatch):
    chat = Chat(pipe, IMAGE, prune=FastV(2, 0.5))
    first = chat.ask(QUESTION)
    assert first.token_ids == pipe.answer([IMAGE], QUESTION, prune=FastV(2, 0.5)).token_ids
    second = chat.ask(SAMPLE[3]["question"])
    assert (second.n_image_tokens, second.kept) == (16, 8) and second.text in ("yes", "no")
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{QUESTION}\n{SAMPLE[3]['question']}\n"))
    code, out, err = cli(capsys, "chat", "--model", TINY_QWEN_MODEL, "--image", IMAGE, "--prune", "fastv",
                         "--dtype", "float32")
    assert code == 0, err
    assert out.split() == [first.text, second.text]
    assert [line for line in err.splitlines() if line.startswith("image tokens kept 8/16")] != []


def test_analyze_draws_the_kept_tokens_on_the_queries_grid(pipe, capsys, tmp_path):
    code, out, err = cli(capsys, "analyze", "--model", TINY_QWEN_MODEL, "--image", IMAGE, "--prompt", QUESTION,
                         "--out-dir", tmp_path, "--dtype", "float32")
    assert code == 0, err
    alone = pipe.answer([IMAGE], QUESTION, prune=FastV(2, 0.5), max_new_tokens=1)
    assert "keeps 8 of 16 tokens (a grid of resampled queries, not patches)" in out
    assert "kept patches: " + ", ".join(map(str, alone.kept_patches[0])) in out
    assert "fastervlm (Qwen-VL's vision tower has no class token" in out
    with Image.open(tmp_path / "kept_patches.png") as picture:
        assert picture.width >= 64 * 6


def test_demo_answers_the_sample_images(capsys):
    code, out, err = cli(capsys, "demo", "--model", TINY_QWEN_MODEL, "--dtype", "float32")
    assert code == 0, err
    for s in SAMPLE:
        assert f"{s['image']}: {s['question']}  (expected: {s['answer']})" in out
    assert out.count("image tokens kept 16/16") == len(SAMPLE) == out.count("image tokens kept 8/16")


def test_the_server_answers_as_the_library_and_reports_the_queries_grid(pipe, start_server):
    server = start_server("--model", str(TINY_QWEN_MODEL))
    status, _, settings = server.request("GET", "/v1/settings")
    assert status == 200 and (settings["patch_grid"], settings["image_mode"]) == (4, "squash")
    status, _, reply = server.request("POST", "/v1/chat/completions", {
        "messages": [image_message(IMAGE, QUESTION)], "max_tokens": 4, "temperature": 0, "prune": "fastv",
        "prune_ratio": 0.5})
    assert status == 200, reply
    alone = pipe.answer([IMAGE], QUESTION, prune=FastV(2, 0.5), max_new_tokens=4)
    usage = reply["usage"]
    assert reply["choices"][0]["message"]["content"] == alone.text == ANSWER
    assert (usage["image_tokens"], usage["image_tokens_kept"], usage["patch_grid"]) == (16, 8, 4)
    assert usage["kept_patches"] == alone.kept_patches
