"""Video at every command-line entry point (generate --video, --batch lines with "video", chat --video,
analyze --video, demo), in process, on a tiny Video-LLaVA with seeded random weights: the mechanics, checked
against the library's own answer to the same question (test_tiny_video.py checks the trained model)."""

import json

import pytest
import torch
from PIL import Image

from minifastv.data import SAMPLES

VIDEOS = json.loads((SAMPLES / "video_questions.json").read_text())
VIDEO, QUESTION = str(SAMPLES / VIDEOS[0]["video"]), VIDEOS[0]["question"]


@pytest.fixture(scope="module")
def pipe(random_video_dir):
    from minifastv.pipeline import Pipeline

    return Pipeline.load(random_video_dir, dtype="float32")


def cli(capsys, *args):
    from minifastv.cli import main

    code = main([*map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_json_reports_the_video_frame_by_frame(random_video_dir, pipe, capsys):
    from minifastv import FastV

    code, out, err = cli(capsys, "generate", "--model", random_video_dir, "--video", VIDEO, "--prompt", QUESTION,
                         "--json", "--max-new-tokens", 3, "--fastv-k", 2, "--fastv-ratio", 0.5, "--dtype", "float32")
    assert code == 0, err
    got = json.loads(out)
    alone = pipe.answer([], QUESTION, videos=[VIDEO], prune=FastV(2, 0.5), max_new_tokens=3)
    cfg = pipe.model.config
    assert got["token_ids"] == alone.token_ids and got["kept_image_slots"] == alone.kept_image_slots
    assert got["n_image_tokens"] == cfg.n_frames * (cfg.vision.n_patches + 1) == 136
    assert got["prompt_ids"].count(cfg.video_token_id) == 1 and cfg.image_token_id not in got["prompt_ids"]
    assert got["prompt_ids"] == pipe.tokenizer.encode_prompt(alone_prompt(QUESTION, n_videos=1))
    assert len(got["kept_patches"]) == cfg.n_frames and len(got["kept_class_tokens"]) == 1
    assert sum(map(len, got["kept_patches"])) + len(got["kept_class_tokens"][0]) == got["kept_image_tokens"] == 68


def alone_prompt(question, n_images=0, n_videos=0):
    from minifastv.tokenizer import chat_prompt

    return chat_prompt(question, n_images=n_images, n_videos=n_videos)


def test_generate_takes_an_image_and_a_video_together(random_video_dir, pipe, capsys):
    image = SAMPLES / "heldout_0.png"
    code, out, err = cli(capsys, "generate", "--model", random_video_dir, "--image", image, "--video", VIDEO,
                         "--prompt", QUESTION, "--json", "--max-new-tokens", 2, "--dtype", "float32")
    assert code == 0, err
    got = json.loads(out)
    cfg = pipe.model.config
    assert got["n_image_tokens"] == cfg.vision.n_patches + 136
    assert got["prompt_ids"].index(cfg.image_token_id) < got["prompt_ids"].index(cfg.video_token_id)
    assert len(got["kept_patches"]) == 1 + cfg.n_frames
    assert got["token_ids"] == pipe.answer([image], QUESTION, videos=[VIDEO], max_new_tokens=2).token_ids


def test_batch_lines_take_videos_and_each_answer_equals_the_question_alone(random_video_dir, pipe, capsys, tmp_path):
    lines = [{"video": str(SAMPLES / q["video"]), "prompt": q["question"]} for q in VIDEOS]
    lines.insert(1, {"video": str(tmp_path / "missing.mp4"), "prompt": QUESTION})
    lines.append({"video": [VIDEO, VIDEO], "prompt": QUESTION})
    lines.append({"image": str(SAMPLES / "heldout_0.png"), "video": VIDEO, "prompt": QUESTION})
    batch = tmp_path / "in.jsonl"
    batch.write_text("\n".join(map(json.dumps, lines)) + "\n")
    code, out, err = cli(capsys, "generate", "--model", random_video_dir, "--batch", batch, "--batch-size", 3,
                         "--max-new-tokens", 3, "--prune", "fastv", "--dtype", "float32")
    results = [json.loads(line) for line in out.splitlines()]
    assert code == 1 and "1 of 7 lines failed" in err
    assert "missing.mp4: no such file" in results[1]["error"]
    from minifastv import FastV

    for line, r in zip(lines, results):
        if "error" in r:
            continue
        videos = line["video"] if isinstance(line["video"], list) else [line["video"]]
        images = [line["image"]] if "image" in line else []
        alone = pipe.answer(images, line["prompt"], videos=videos, prune=FastV(2, 0.5), max_new_tokens=3)
        assert r["token_ids"] == alone.token_ids and r["kept_image_slots"] == alone.kept_image_slots


def test_chat_about_a_video_keeps_its_tokens_for_later_questions(random_video_dir, capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO(f"{QUESTION}\nhow many shapes appear?\n"))
    code, out, err = cli(capsys, "chat", "--model", random_video_dir, "--video", VIDEO, "--max-new-tokens", 2,
                         "--prune", "fastv", "--dtype", "float32")
    assert code == 0, err
    summaries = [line for line in err.splitlines() if line.startswith("visual tokens kept")]
    assert len(summaries) == 2 and all(s.startswith("visual tokens kept 68/136") for s in summaries)


def test_analyze_prints_each_frames_kept_patches_as_the_answer_reports_them(random_video_dir, pipe, capsys, tmp_path):
    from minifastv import FastV

    code, out, err = cli(capsys, "analyze", "--model", random_video_dir, "--video", VIDEO, "--prompt", QUESTION,
                         "--out-dir", tmp_path, "--dtype", "float32")
    assert code == 0, err
    alone = pipe.answer([], QUESTION, videos=[VIDEO], prune=FastV(2, 0.5), max_new_tokens=1)
    printed = [line for line in out.splitlines() if line.startswith("frame ")]
    assert len(printed) == 8
    for f, line in enumerate(printed):
        patches, _, cls = line.removeprefix(f"frame {f} kept patches: ").partition("; ")
        assert patches == (", ".join(map(str, alone.kept_patches[f])) or "none")
        assert (cls == "class token kept") == (f in alone.kept_class_tokens[0])
    assert "fastervlm, visionzip, cdpruner take no video" in out
    with Image.open(tmp_path / "kept_patches.png") as one, Image.open(tmp_path / "kept_patches_methods.png") as every:
        assert one.width >= 8 * 32 * 6 and every.height > one.height  # eight frames side by side; a row per method


def test_demo_answers_the_sample_videos_with_a_video_model(random_video_dir, capsys):
    code, out, err = cli(capsys, "demo", "--model", random_video_dir, "--dtype", "float32")
    assert code == 0, err
    for q in VIDEOS:
        assert f"{q['video']}: {q['question']}  (expected: {q['answer']})" in out
    assert out.count("visual tokens kept 136/136") == len(VIDEOS) and out.count("visual tokens kept 68/136") == 4


@pytest.mark.parametrize("command", ["generate", "chat", "analyze"])
def test_a_video_for_an_image_model_is_a_named_error(capsys, command, monkeypatch, tmp_path):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("what colour?\n"))
    extra = {"generate": ["--prompt", "what colour"], "chat": [],
             "analyze": ["--prompt", "what colour", "--out-dir", tmp_path]}[command]
    code, _, err = cli(capsys, command, "--video", VIDEO, *extra)
    assert code == 2 and f"{VIDEO}: this model (llava) takes no video" in err, err


def test_a_video_without_pyav_names_the_extra(random_video_dir, capsys, monkeypatch):
    import builtins

    real = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "av" else real(name, *a, **k))
    code, _, err = cli(capsys, "generate", "--model", random_video_dir, "--video", VIDEO, "--prompt", QUESTION)
    assert code == 2 and "pip install 'minifastv[video]'" in err


def test_a_bad_video_file_is_one_line_naming_it(random_video_dir, capsys, tmp_path):
    bad = tmp_path / "notes.mp4"
    bad.write_text("not a video")
    code, out, err = cli(capsys, "generate", "--model", random_video_dir, "--video", bad, "--prompt", QUESTION)
    assert code == 2 and out == "" and err.strip().splitlines()[-1].startswith(f"error: {bad}: not a video")


def test_the_video_prompt_is_the_llava_v1_template_with_one_video_placeholder(pipe):
    batch = pipe.inputs([], QUESTION, [torch.zeros(8, 3, 32, 32)])
    ids = batch.input_ids[0].tolist()
    assert ids.count(pipe.tokenizer.video_token_id) == 1 and ids[0] == pipe.tokenizer.bos_token_id
    assert ids == pipe.tokenizer.encode_prompt(alone_prompt(QUESTION, n_videos=1))


def test_frames_sets_how_many_frames_a_video_gives_where_the_model_allows_it(random_video_dir, pipe, capsys,
                                                                             tmp_path):
    """Without temporal attention a video model takes any number of frames; with it (the shipped tiny video model's
    tower, and this one's) only its own, and another number is a named error."""
    import dataclasses

    import minifastv
    from minifastv.models import VideoLlavaModel
    from minifastv.pipeline import Pipeline
    from minifastv.pruning import make

    assert pipe.model.config.temporal
    code, _, err = cli(capsys, "generate", "--model", random_video_dir, "--video", VIDEO, "--prompt", QUESTION,
                       "--frames", 4)
    assert code == 2 and "--frames 4: this model's video tower has temporal attention learnt for 8 frames" in err
    torch.manual_seed(0)
    plain = VideoLlavaModel(dataclasses.replace(pipe.model.config, temporal=False)).eval()
    minifastv.save(plain, pipe.tokenizer, tmp_path / "plain")
    code, out, err = cli(capsys, "generate", "--model", tmp_path / "plain", "--video", VIDEO, "--prompt", QUESTION,
                         "--json", "--max-new-tokens", 2, "--frames", 4, "--prune", "uniform", "--dtype", "float32")
    assert code == 0, err
    got = json.loads(out)
    assert got["n_image_tokens"] == 4 * 17 and len(got["kept_patches"]) == 4 and got["kept_image_tokens"] == 34
    four = Pipeline.load(tmp_path / "plain", dtype="float32")
    four.use_frames(4)
    assert got["token_ids"] == four.answer([], QUESTION, videos=[VIDEO], max_new_tokens=2,
                                           prune=make("uniform", 0.5)).token_ids
    pipe.use_frames(8)  # its own number is fine
    code, _, err = cli(capsys, "generate", "--video", VIDEO, "--prompt", "what colour", "--frames", 4)
    assert code == 2 and "--frames 4: this model (llava) takes no video" in err
