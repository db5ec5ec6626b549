"""LLaVA-NeXT through the entry points, on a random tiny model converted from transformers: the pipeline, a
batch, chat and the server prepare each image's tiles, its size and a placeholder per image token, and answer
as the model does on inputs made here by hand from minifastv.anyres."""

import json
import queue
import subprocess
import sys

import pytest
import torch
from helpers import write_hf_checkpoint
from PIL import Image
from test_anyres import noise as picture
from test_llava_next import hf_llava_next

from minifastv import Chat, Pipeline, generate
from minifastv.convert import convert
from minifastv.image import preprocess
from minifastv.inputs import system_line
from minifastv.tokenizer import chat_prompt

QUESTION = "What colour is the square?"


@pytest.fixture(scope="module")
def next_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("next")
    return convert(write_hf_checkpoint(hf_llava_next(), tmp / "src"), tmp / "out", log=lambda _: None)


@pytest.fixture(scope="module")
def pipe(next_dir):
    return Pipeline.load(next_dir, dtype="float32")


def by_hand(pipe, images, question=QUESTION, new_tokens=6):
    """The answer's ids from inputs made here: tiles and base images from anyres, the prompt's image placeholder
    repeated n_image_tokens times."""
    cfg, tok = pipe.model.config, pipe.tokenizer
    ids = []
    for t in tok.encode_prompt(chat_prompt(question, len(images), system_line(cfg))):
        ids += [t] * (cfg.n_image_tokens(images[0].height, images[0].width) if t == cfg.image_token_id else 1)
        images = images[1:] if t == cfg.image_token_id else images
    return ids


def test_the_pipeline_prepares_tiles_sizes_and_placeholders(pipe):
    cfg = pipe.model.config
    images = [picture(50, 30), picture(20, 90, seed=1)]
    batch = pipe.inputs(images, QUESTION)
    tiles = [preprocess(t, cfg.vision.image_size, "crop") for im in images for t in cfg.tiles(im)]
    assert torch.equal(batch.pixel_values, torch.stack(tiles))
    assert batch.image_sizes.tolist() == [[30, 50], [90, 20]]
    expected = by_hand(pipe, list(images))
    assert batch.input_ids[0].tolist() == expected
    assert (batch.input_ids == cfg.image_token_id).sum() == sum(cfg.n_image_tokens(im.height, im.width)
                                                                for im in images)
    answer = pipe.answer(images, QUESTION, max_new_tokens=6)
    ids = generate(pipe.model, torch.tensor([expected]), torch.stack(tiles), max_new_tokens=6,
                   image_sizes=torch.tensor([[30, 50], [90, 20]]))[0].tolist()
    counts = [cfg.n_image_tokens(30, 50), cfg.n_image_tokens(90, 20)]
    assert answer.token_ids == ids[:len(answer.token_ids)] and answer.n_image_tokens == sum(counts)
    assert [n for _, n, _ in answer.groups] == counts                    # one group per image, not per token


def test_an_image_with_alpha_is_made_rgb_before_it_is_tiled(pipe):
    """As transformers' processor converts to RGB first: resizing RGBA would weigh colours by their alpha."""
    rgba = picture(50, 30).convert("RGBA")
    rgba.putalpha(Image.fromarray(torch.randint(0, 256, (30, 50), dtype=torch.uint8).numpy()))
    tiled = [pipe.inputs([im], QUESTION).pixel_values for im in (rgba, rgba.convert("RGB"))]
    assert torch.equal(*tiled)


def test_a_batch_of_images_of_different_sizes_answers_as_each_alone(pipe):
    requests = [([picture(50, 30)], QUESTION), ([picture(70, 70, seed=2)], "Is there a circle at the top left?"),
                ([picture(10, 8, seed=3), picture(30, 50, seed=4)], QUESTION)]
    together = pipe.answer_batch(requests, max_new_tokens=5)
    for (images, question), answer in zip(requests, together):
        assert answer.token_ids == pipe.answer(images, question, max_new_tokens=5).token_ids


def test_chat_keeps_the_image_and_fastv_prunes_its_packed_tokens(pipe):
    from minifastv.pruning import FastV

    image = picture(50, 30)
    chat = Chat(pipe, image, max_new_tokens=4, prune=FastV(2, 0.5))
    first = chat.ask(QUESTION)
    assert first.token_ids == pipe.answer([image], QUESTION, prune=FastV(2, 0.5), max_new_tokens=4).token_ids
    n = pipe.model.config.n_image_tokens(30, 50)
    assert (first.n_image_tokens, first.kept) == (n, n - n // 2)
    second = chat.ask("how many triangles are there")
    assert second.n_image_tokens == n and len(second.token_ids) >= 1


def test_the_server_widens_the_prompt_and_answers_as_the_pipeline(pipe):
    import base64
    import io

    from minifastv.serve.engine import Engine, Job
    from minifastv.serve.protocol import Limits, read_request

    image = picture(20, 90, seed=5)
    data = io.BytesIO()
    image.save(data, "PNG")
    url = "data:image/png;base64," + base64.b64encode(data.getvalue()).decode()
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": QUESTION}]}],
            "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    spec = read_request(body, pipe, Limits(), None, "next")
    assert spec["image_sizes"].tolist() == [[90, 20]] and spec["ids"] == by_hand(pipe, [image])
    spec.pop("stream"), spec.pop("include_usage")
    events, engine = queue.Queue(), Engine(pipe, batch_wait=0).start()
    engine.submit(Job(**spec, send=events.put))
    kind, *rest = events.get(timeout=60)
    while kind == "text":
        kind, *rest = events.get(timeout=60)
    engine.drain(0)
    engine.close()
    expected = generate(pipe.model, torch.tensor([spec["ids"]]), spec["pixels"], max_new_tokens=5,
                        image_sizes=spec["image_sizes"])[0].tolist()
    assert kind == "done" and rest[0].token_ids == expected


def test_generate_on_the_command_line(next_dir, tmp_path):
    picture(50, 30).save(tmp_path / "wide.png")
    result = subprocess.run([sys.executable, "-m", "minifastv", "generate", "--model", str(next_dir), "--image",
                             str(tmp_path / "wide.png"), "--prompt", QUESTION, "--max-new-tokens", "3", "--prune",
                             "fastv", "--dtype", "float32"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    n = Pipeline.load(next_dir).model.config.n_image_tokens(30, 50)
    assert f"image tokens kept {n - n // 2}/{n}" in result.stdout + result.stderr


def test_analyze_draws_the_base_image_and_the_tiles_and_says_what_it_leaves_out(next_dir, tmp_path):
    """The base image's kept patches, and the tile grid's kept cells drawn on the image itself: the same cells
    and newline rows as generate --json reports (kept_grid), the picture as large as the image."""
    picture(50, 30).save(tmp_path / "wide.png")
    common = ["--model", str(next_dir), "--image", str(tmp_path / "wide.png"), "--prompt", QUESTION, "--dtype",
              "float32", "--prune", "fastv", "--anyres", "views-apart"]
    result = subprocess.run([sys.executable, "-m", "minifastv", "analyze", *common, "--out-dir", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stderr
    cfg = Pipeline.load(next_dir).model.config
    grid, n = cfg.vision.grid, cfg.n_image_tokens(30, 50)
    assert "FastV K=2 R=0.5, views-apart keeps" in result.stdout and f"of {grid * grid} patches of the base image" \
        in result.stdout
    assert "not drawn: uniform (the per-image methods" in result.stdout   # and fastv, dart, ... are drawn
    # every method at FastV's share of all the image's tokens, not of the base image's
    assert f"every method keeping {(n - n // 2) / n:.1%} of the image tokens" in result.stdout
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"attention_shares.png", "kept_patches.png",
                                                             "kept_patches_methods.png", "kept_tiles.png"}
    assert Image.open(tmp_path / "out" / "kept_tiles.png").size == (50, 30)
    said = dict(line.split(": ", 1) for line in result.stdout.splitlines() if line.startswith("kept "))
    generated = subprocess.run([sys.executable, "-m", "minifastv", "generate", *common, "--json",
                                "--max-new-tokens", "1"], capture_output=True, text=True, timeout=180, check=True)
    report = json.loads(generated.stdout)
    assert said["kept patches"] == ", ".join(map(str, report["kept_patches"][0]))
    assert said["kept cells"] == ", ".join(map(str, report["kept_grid"][0]["kept"]))
    assert said["kept newlines (rows)"] == ", ".join(map(str, report["kept_grid"][0]["newlines"]))


def test_an_answer_reports_its_kept_tokens_on_the_base_image_and_on_the_tile_grid(pipe):
    """kept_patches: the base image's cells only; kept_grid: the tile grid's shape, its kept cells (row-major)
    and the rows whose newline was kept, read off kept_image_slots with a layout made here."""
    from minifastv import anyres
    from minifastv.pruning import FastV

    images = [picture(90, 40), picture(20, 60, seed=3)]
    answer = pipe.answer(images, QUESTION, prune=FastV(2, 0.6), max_new_tokens=1)
    cfg, ids = pipe.model.config, answer.prompt_ids   # a placeholder per image token: slots are ids
    starts = [i for i, t in enumerate(ids) if t == cfg.image_token_id and ids[i - 1] != t]
    assert len(answer.kept_grid) == len(answer.kept_patches) == len(starts) == 2
    for image, grid, base, first in zip(images, answer.kept_grid, answer.kept_patches, starts):
        p, rows, cols = anyres.grid_shape(image.height, image.width, cfg.vision.image_size, cfg.vision.patch_size,
                                          cfg.pinpoints)
        kept = [s - first for s in answer.kept_image_slots if first <= s < first + p * p + rows * (cols + 1)]
        assert base == [t for t in kept if t < p * p]
        on_grid = [divmod(t - p * p, cols + 1) for t in kept if t >= p * p]
        assert grid == {"rows": rows, "cols": cols, "kept": [r * cols + c for r, c in on_grid if c < cols],
                        "newlines": [r for r, c in on_grid if c == cols]}
    assert "kept_grid" in answer.as_json() and "parts" not in answer.as_json()
    assert sum(len(g["kept"]) + len(g["newlines"]) for g in answer.kept_grid) + sum(map(len, answer.kept_patches)) \
        == answer.kept


@pytest.mark.parametrize("template, first, later", [
    ("vicuna_v1", "SYS USER: <image>\nQ? ASSISTANT:", "USER: Q? ASSISTANT:"),
    ("mistral_instruct", "[INST] <image>\nQ? [/INST]", "[INST] Q? [/INST]"),
    ("chatml", "<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\n<image>\nQ?<|im_end|>\n<|im_start|>assistant\n",
     "\n<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n"),
])
def test_each_template_lays_out_turns_as_llavas_conversations(template, first, later):
    """LLaVA's conversation.py: vicuna_v1 (sep " ", sep2 </s>), mistral_instruct (LLAMA_2 style, no system),
    chatml_direct (each message ended by <|im_end|> and a newline)."""
    from minifastv.tokenizer import TEMPLATES, chat_prompt

    assert chat_prompt("Q?", 1, "SYS", template=template) == first   # mistral_instruct has no system line
    assert TEMPLATES[template][1]("", "Q?") == later


@pytest.fixture(scope="module")
def mistral_pipe(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mistral")
    hf = hf_llava_next(n_kv_heads=2, rope_theta=1e6, seed=2, decoder="mistral")
    return Pipeline.load(convert(write_hf_checkpoint(hf, tmp / "src"), tmp / "out", log=lambda _: None),
                         dtype="float32")


def test_a_mistral_llava_next_converts_to_the_mistral_template_and_chats_in_it(mistral_pipe):
    from minifastv.convert import config_from_hf

    pipe, cfg, tok = mistral_pipe, mistral_pipe.model.config, mistral_pipe.tokenizer
    assert (cfg.template, cfg.system, tok.template) == ("mistral_instruct", "", "mistral_instruct")
    image = picture(50, 30)
    ids = pipe.inputs([image], QUESTION).input_ids[0].tolist()
    n = cfg.n_image_tokens(30, 50)
    assert ids == [t for t in tok.encode_prompt(f"[INST] <image>\n{QUESTION} [/INST]")
                   for t in ([t] * n if t == cfg.image_token_id else [t])]
    chat = Chat(pipe, image, max_new_tokens=3)
    first = chat.ask(QUESTION)
    assert first.token_ids == pipe.answer([image], QUESTION, max_new_tokens=3).token_ids
    turn = tok.encode_turn("how many triangles are there")
    assert turn == tok.encode_prompt("[INST] how many triangles are there [/INST]")[1:]
    chat.ask("how many triangles are there")
    # Yi's vocabulary picks ChatML with LLaVA-NeXT-34B's system line; Vicuna keeps vicuna_v1
    yi = {"architectures": ["LlavaNextForConditionalGeneration"], "image_grid_pinpoints": [[336, 672]],
          "text_config": {"vocab_size": 64064}}
    assert (config_from_hf(yi).template, config_from_hf(yi).system) == ("chatml", "Answer the questions.")
    assert config_from_hf({**yi, "text_config": {}}).template == "vicuna_v1"


def test_a_training_batch_widens_placeholders_and_their_labels(pipe):
    """conversations() for LLaVA-NeXT: each image a run of placeholders (labels IGNORE), its tiles and size; the
    loss is the answers' cross-entropy over the model's own logits."""
    from minifastv.inputs import IGNORE, conversations

    cfg = pipe.model.config
    images = [picture(50, 30), picture(20, 90, seed=1)]
    dialogues = [([images[0]], [(QUESTION, "red"), ("how many triangles are there", "three")]),
                 ([images[1]], [(QUESTION, "yes")])]
    batch = conversations(pipe.tokenizer, cfg, dialogues)
    assert batch.image_sizes.tolist() == [[30, 50], [90, 20]]
    for row, labels, im in zip(batch.input_ids, batch.labels, images):
        here = row == cfg.image_token_id
        assert int(here.sum()) == cfg.n_image_tokens(im.height, im.width) and (labels[here] == IGNORE).all()
    with torch.no_grad():
        loss = pipe.model.loss(batch.input_ids, batch.pixel_values, batch.labels, attention_mask=batch.attention_mask,
                               image_sizes=batch.image_sizes)
        logits = pipe.model(batch.input_ids, batch.pixel_values, attention_mask=batch.attention_mask,
                            image_sizes=batch.image_sizes)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch.labels[:, 1:].flatten(),
                                                 ignore_index=IGNORE)
    torch.testing.assert_close(loss, expected)


def test_bench_measures_a_llava_next_prompt(next_dir):
    """bench --family llava-next's measurement on a tiny model: the prompt holds one 672 x 672 image's tokens,
    the vision time is the tiles' (encode_anyres), and each setting keeps its share of them."""
    from minifastv.bench import cpu7b

    cfg = Pipeline.load(next_dir, dtype="float32").model.config
    n = cfg.n_image_tokens(672, 672)
    got = cpu7b.measure(next_dir, ["off", "K=2 R=0.5", "K=2 320 kept"], 1, 2, 1, "float32")
    assert got["prompt_tokens"] == 56 + n and got["vision_s"] > 0
    assert [s["kept"] for s in got["settings"].values()] == [n, round(n / 2), round(n * 320 / 2928)]
