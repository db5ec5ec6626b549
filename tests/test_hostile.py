"""Hostile and careless input at every entry point (load, save, convert, train_tiny.py, images, prompts,
generate, the CLI): each failure is an error of the documented type whose message names the problem, and an
interrupted write leaves nothing that `load` would accept. The README's "Errors" section lists them."""

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from helpers import build_tokenizer, hf_llava
from PIL import Image
from safetensors.torch import load_file, save_file

import minifastv
from minifastv import CheckpointError, FastV, ImageError, chat_prompt, generate, load_image, preprocess
from minifastv.checkpoint import ShardWriter
from minifastv.convert import convert
from minifastv.data import SAMPLES, TINY_MODEL
from minifastv.pipeline import Pipeline


@pytest.fixture(scope="module")
def tiny():
    """The tiny preset with seeded random weights and the task's tokenizer."""
    import train_tiny

    tok = train_tiny.build_tokenizer()
    return Pipeline(train_tiny.build_model(tok, seed=0).eval(), tok)


@pytest.fixture
def saved(tiny, tmp_path):
    return minifastv.save(tiny.model, tiny.tokenizer, tmp_path / "ckpt")


def edit_config(path, edit):
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def edit_weights(path, edit):
    state = load_file(path / "model.safetensors")
    edit(state)
    save_file(state, str(path / "model.safetensors"))


# --- checkpoints ---------------------------------------------------------------------------------------


def test_config_missing_field_is_caught_by_the_tensor_shapes(saved):
    edit_config(saved, lambda c: c["text"].pop("dim"))  # falls back to the default 4096
    with pytest.raises(CheckpointError, match=r"llm\.embed_tokens\.weight has shape \[\d+, 128\], "
                                              r"the config implies \[\d+, 4096\]"):
        minifastv.load(saved)


def test_contradictory_config_is_named(saved):
    edit_config(saved, lambda c: c["text"].update(n_heads=5))
    with pytest.raises(CheckpointError, match=r"config\.json: text: dim 128 is not divisible by n_heads 5"):
        minifastv.load(saved)


def test_config_of_wrong_type_is_named(saved):
    edit_config(saved, lambda c: c["vision"].update(n_layers="four"))
    with pytest.raises(CheckpointError, match=r"config\.json: .*n_layers"):
        minifastv.load(saved)


def test_non_finite_weights_are_refused(saved):
    def poison(state):
        state["llm.norm.weight"][3] = float("nan")

    edit_weights(saved, poison)
    minifastv.load(saved)  # loading maps the weights without reading them; conversion scans them
    with pytest.raises(CheckpointError, match=r"model\.safetensors: llm\.norm\.weight contains NaN or infinite values"):
        minifastv.load(saved, check=True)


def test_integer_weights_are_refused(saved):
    edit_weights(saved, lambda s: s.update({"llm.norm.weight": s["llm.norm.weight"].long()}))
    with pytest.raises(CheckpointError, match=r"llm\.norm\.weight has dtype torch\.int64, expected floating point"):
        minifastv.load(saved)


def test_pickled_weights_are_not_read_by_load(saved, capfd):
    """load reads only safetensors: a pickled .bin (here one whose unpickling would run code) is never opened."""
    class Exploit:
        def __reduce__(self):
            return (print, ("pickle code ran",))

    (saved / "model.safetensors").unlink()
    torch.save({"llm.norm.weight": Exploit()}, saved / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"ckpt: no model\.safetensors"):
        minifastv.load(saved)
    assert "pickle code ran" not in capfd.readouterr().out


def test_wrong_dtype_names(saved):
    for bad in ("fp16", "float64", "int8", ""):
        with pytest.raises(ValueError, match=f"unknown dtype {bad!r}"):
            minifastv.load(saved, dtype=bad)


# --- writing: existing, unwritable or interrupted outputs ---------------------------------------------


def interrupt_after(monkeypatch, n_tensors: int):
    """Ctrl-C arrives while the n-th tensor is being written."""
    real, calls = ShardWriter.add, []

    def add(self, name, tensor):
        calls.append(name)
        if len(calls) == n_tensors:
            raise KeyboardInterrupt
        real(self, name, tensor)

    monkeypatch.setattr(ShardWriter, "add", add)


def assert_nothing_loadable(parent: Path, out: Path, keep=()):
    assert sorted(p.name for p in parent.iterdir()) == sorted(keep), "a partial output was left behind"
    with pytest.raises(FileNotFoundError):
        minifastv.load(out)


def test_interrupted_save_leaves_nothing(tiny, tmp_path, monkeypatch):
    interrupt_after(monkeypatch, 10)
    with pytest.raises(KeyboardInterrupt):
        minifastv.save(tiny.model, tiny.tokenizer, tmp_path / "out", max_shard_bytes=50_000)
    assert_nothing_loadable(tmp_path, tmp_path / "out")


def test_interrupted_overwrite_keeps_the_old_checkpoint(tiny, saved, monkeypatch):
    before = {f.name: f.read_bytes() for f in saved.iterdir()}
    interrupt_after(monkeypatch, 10)
    with pytest.raises(KeyboardInterrupt):
        minifastv.save(tiny.model, tiny.tokenizer, saved, overwrite=True)
    assert {f.name: f.read_bytes() for f in saved.iterdir()} == before
    assert sorted(p.name for p in saved.parent.iterdir()) == ["ckpt"]


@pytest.fixture(scope="module")
def hf_source(tmp_path_factory):
    """A transformers-layout checkpoint directory to convert."""
    src = tmp_path_factory.mktemp("hf") / "src"
    src.mkdir()
    model = hf_llava()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps(model.config.to_dict()))
    build_tokenizer(src / "tokenizer.json")
    return src


def test_interrupted_conversion_leaves_nothing(hf_source, tmp_path, monkeypatch):
    interrupt_after(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        convert(hf_source, tmp_path / "out", log=lambda _: None)
    assert_nothing_loadable(tmp_path, tmp_path / "out")


def test_truncated_bin_shard_is_named(hf_source, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(hf_source, src)
    state = load_file(src / "model.safetensors")
    (src / "model.safetensors").unlink()
    torch.save(state, src / "pytorch_model.bin")
    data = (src / "pytorch_model.bin").read_bytes()
    (src / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: refused or unreadable"):
        convert(src, tmp_path / "out", log=lambda _: None)
    assert_nothing_loadable(tmp_path, tmp_path / "out", keep=["src"])


def test_missing_bin_shard_is_named(hf_source, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(hf_source, src)
    state = load_file(src / "model.safetensors")
    (src / "model.safetensors").unlink()
    names = list(state)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:]), 1):
        file = f"pytorch_model-0000{i}-of-00002.bin"
        torch.save({k: state[k] for k in part}, src / file)
        weight_map.update(dict.fromkeys(part, file))
    (src / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (src / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"pytorch_model-00002-of-00002\.bin: weight file not found"):
        convert(src, tmp_path / "out", log=lambda _: None)
    assert_nothing_loadable(tmp_path, tmp_path / "out", keep=["src"])


@pytest.mark.parametrize("write", ["save", "convert"])
def test_output_under_a_file_is_named(tiny, hf_source, tmp_path, write):
    (tmp_path / "afile").write_text("not a directory")
    out = tmp_path / "afile" / "ckpt"
    with pytest.raises(NotADirectoryError, match=r"ckpt: cannot create it, .*afile is a file, not a directory"):
        if write == "save":
            minifastv.save(tiny.model, tiny.tokenizer, out)
        else:
            convert(hf_source, out, log=lambda _: None)


def test_existing_output_is_not_replaced_without_force(tiny, saved):
    with pytest.raises(FileExistsError, match="ckpt: already exists"):
        minifastv.save(tiny.model, tiny.tokenizer, saved)


def test_interrupted_training_writes_nothing(tmp_path, monkeypatch, capsys):
    import train_tiny

    real, calls = train_tiny.training_batch, []

    def batch(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(train_tiny, "training_batch", batch)
    with pytest.raises(KeyboardInterrupt):
        train_tiny.main(["--steps", "5", "--batch-size", "2", "--out", str(tmp_path / "out")])
    assert_nothing_loadable(tmp_path, tmp_path / "out")


def test_training_arguments(tmp_path, capsys):
    import train_tiny

    (tmp_path / "out").mkdir()
    assert train_tiny.main(["--steps", "1", "--out", str(tmp_path / "out")]) == 2
    assert "out: already exists (--force replaces it)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_tiny.main(["--steps", "0", "--out", str(tmp_path / "new")])
    assert "--steps must be >= 1, got 0" in capsys.readouterr().err


def test_training_writes_a_new_directory_by_default(tmp_path, monkeypatch):
    """The README's `python train_tiny.py`, run twice, never touches the shipped model: it writes results/tiny."""
    import train_tiny

    shipped = (TINY_MODEL / "model.safetensors").read_bytes()
    monkeypatch.chdir(tmp_path)
    assert train_tiny.main(["--steps", "1", "--batch-size", "2", "--eval-every", "0"]) == 0
    assert (tmp_path / "results" / "tiny" / "model.safetensors").is_file()
    assert (TINY_MODEL / "model.safetensors").read_bytes() == shipped


# --- images --------------------------------------------------------------------------------------------


def test_missing_image(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.png: image file not found"):
        load_image(tmp_path / "missing.png")


def test_not_an_image(tmp_path):
    (tmp_path / "notes.png").write_text("this is text")
    with pytest.raises(ImageError, match=r"notes\.png: not a readable image"):
        load_image(tmp_path / "notes.png")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image(tmp_path, fmt):
    file = tmp_path / f"cut.{fmt.lower()}"
    noise = Image.frombytes("RGB", (64, 64), torch.randint(0, 256, (64 * 64 * 3,), dtype=torch.uint8).numpy().tobytes())
    noise.save(file, fmt)
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(ImageError, match=rf"cut\.{fmt.lower()}: not a readable image"):
        load_image(file)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "1", "CMYK"])
def test_other_pixel_formats_become_rgb(tmp_path, mode):
    rgb = Image.new("RGB", (5, 3), (200, 30, 60))
    image = rgb.convert(mode)
    image.save(tmp_path / "x.tiff")
    loaded = load_image(tmp_path / "x.tiff")
    assert loaded.mode == "RGB" and loaded.size == (5, 3)
    assert loaded.getpixel((2, 1)) == image.convert("RGB").getpixel((2, 1))


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    image = Image.new("I;16", (4, 1))
    for x, v in enumerate((0, 257 * 100, 32768, 65535)):
        image.putpixel((x, 0), v)
    image.save(tmp_path / "deep.png")
    loaded = load_image(tmp_path / "deep.png")
    assert [loaded.getpixel((x, 0))[0] for x in range(4)] == [0, 100, 127, 255]


def test_float_images_are_refused():
    with pytest.raises(ImageError, match="floating-point images are not supported"):
        preprocess(Image.new("F", (8, 8)), 32)


@pytest.mark.parametrize("size", [(1, 1), (10000, 200), (200, 10000)])
@pytest.mark.parametrize("mode", ["pad", "crop"])
def test_extreme_aspect_and_tiny_images(size, mode):
    pixels = preprocess(Image.new("RGB", size, (10, 200, 30)), 64, mode)
    assert pixels.shape == (3, 64, 64) and pixels.isfinite().all()


def test_too_large_to_pad_is_named():
    with pytest.raises(ImageError, match=r"image is 20000x10; padding it to a square needs a side of 20000"):
        preprocess(Image.new("RGB", (20000, 10)), 64, "pad")


# --- prompts and generation ----------------------------------------------------------------------------


def prompt_ids(model, question="what colour is the circle in row one column two?", n_images=1):
    return torch.tensor([model.tokenizer.encode_prompt(chat_prompt(question, n_images=n_images))])


def pixels(n, size=64):
    return torch.randn(n, 3, size, size)


@pytest.mark.parametrize("markers, images", [(2, 1), (1, 2), (0, 1), (1, 0)])
def test_markers_must_match_images(tiny, markers, images):
    with pytest.raises(ValueError, match=rf"the prompt has {markers} image placeholder\(s\) .* but {images} image\(s\)"):
        generate(tiny.model, prompt_ids(tiny, n_images=markers), pixels(images) if images else None, max_new_tokens=1)


def test_prompt_longer_than_the_context(tiny):
    ids = prompt_ids(tiny, "red " * 600)
    with pytest.raises(ValueError, match=r"the merged prompt has \d+ tokens .* more than the context of 512"):
        generate(tiny.model, ids, pixels(1), max_new_tokens=1)


def test_prompt_plus_new_tokens_longer_than_the_context(tiny):
    with pytest.raises(ValueError, match=r"\+ max_new_tokens \(500\)"):
        generate(tiny.model, prompt_ids(tiny), pixels(1), max_new_tokens=500)


def test_empty_prompt(tiny):
    with pytest.raises(ValueError, match=r"input_ids is empty"):
        generate(tiny.model, torch.zeros(1, 0, dtype=torch.long), max_new_tokens=1)
    with pytest.raises(ValueError, match=r"sample 1 has no tokens"):
        ids = prompt_ids(tiny, n_images=0).repeat(2, 1)
        tiny.model(ids, attention_mask=torch.stack([torch.ones(ids.shape[1]), torch.zeros(ids.shape[1])]).long())


@pytest.mark.parametrize("n", [0, -3, 2.5])
def test_max_new_tokens_must_be_positive(tiny, n):
    with pytest.raises(ValueError, match=rf"max_new_tokens must be a positive integer, got {n}"):
        generate(tiny.model, prompt_ids(tiny), pixels(1), max_new_tokens=n)


@pytest.mark.parametrize("k, ratio, message", [
    (0, 0.5, "FastV k must be"), (-1, 0.5, "FastV k must be"), (2.0, 0.5, "FastV k must be"),
    (2, 1.0, "FastV ratio must be"), (2, -0.1, "FastV ratio must be"), (2, "half", "FastV ratio must be"),
])
def test_invalid_fastv(k, ratio, message):
    with pytest.raises(ValueError, match=message):
        FastV(k, ratio)


def test_fastv_without_an_image(tiny):
    with pytest.raises(ValueError, match="FastV prunes image tokens, but the batch has no image"):
        generate(tiny.model, prompt_ids(tiny, n_images=0), max_new_tokens=1, prune=FastV(2, 0.5))


def test_batch_items_with_different_image_counts(tiny):
    """Two images in one sample and one in the other is a valid batch: each sample equals itself run alone.
    The images must add up, though."""
    a, b = prompt_ids(tiny, n_images=2)[0], prompt_ids(tiny, n_images=1)[0]
    ids = torch.stack([a, torch.cat([torch.zeros(len(a) - len(b), dtype=torch.long), b])])
    mask = (torch.arange(len(a))[None] >= torch.tensor([[0], [len(a) - len(b)]])).long()
    px = pixels(3)
    out = generate(tiny.model, ids, px, attention_mask=mask, max_new_tokens=3, prune=FastV(2, 0.5))
    assert out[0].tolist() == generate(tiny.model, a[None], px[:2], max_new_tokens=3, prune=FastV(2, 0.5))[0].tolist()
    assert out[1].tolist() == generate(tiny.model, b[None], px[2:], max_new_tokens=3, prune=FastV(2, 0.5))[0].tolist()
    with pytest.raises(ValueError, match=r"the prompt has 3 image placeholder\(s\) .* but 2 image\(s\)"):
        generate(tiny.model, ids, px[:2], attention_mask=mask, max_new_tokens=1)


def test_bad_pixels_and_ids(tiny):
    with pytest.raises(ValueError, match=r"pixel_values must have shape \[num_images, 3, 64, 64\], got \[1, 3, 32, 32\]"):
        generate(tiny.model, prompt_ids(tiny), pixels(1, 32), max_new_tokens=1)
    bad = pixels(1)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="pixel_values contains NaN"):
        generate(tiny.model, prompt_ids(tiny), bad, max_new_tokens=1)
    ids = prompt_ids(tiny)
    vocab = tiny.model.config.text.vocab_size
    for bad_id in (10**6, vocab, -1):  # the vocabulary size itself is one past the last id
        ids = prompt_ids(tiny)
        ids[0, 2] = bad_id
        with pytest.raises(ValueError, match=rf"token id {bad_id} is outside the vocabulary \[0, {vocab}\)"):
            generate(tiny.model, ids, pixels(1), max_new_tokens=1)
    ids = prompt_ids(tiny)
    ids[0, 2] = vocab - 1  # the last id is a word
    generate(tiny.model, ids, pixels(1), max_new_tokens=1)


# --- the command line ------------------------------------------------------------------------------------


@pytest.fixture
def cli(saved, capsys):
    """Run `python -m minifastv ...` in-process on the random tiny checkpoint; returns (exit code, stderr)."""
    from minifastv.cli import main

    def run(*args):
        code = main([str(a) for a in args])
        return code, capsys.readouterr().err

    image = SAMPLES / "heldout_0.png"
    return run, saved, image


@pytest.mark.parametrize("case, extra, message", [
    ("empty prompt", ["--prompt", "  "], "the prompt is empty"),
    ("bad ratio", ["--prompt", "what colour", "--fastv-k", "2", "--fastv-ratio", "1.5"], "FastV ratio must be"),
    ("bad k", ["--prompt", "what colour", "--fastv-k", "0"], "FastV k must be"),
    ("zero tokens", ["--prompt", "what colour", "--max-new-tokens", "0"], "max_new_tokens must be a positive integer"),
    ("image marker", ["--prompt", "<image> hi"], "images are passed separately (--image"),
    ("huge token budget", ["--prompt", "what colour", "--max-new-tokens", "1000000000"], "exceeds the context"),
    ("unknown word", ["--prompt", "is there a Zebra?"], "the tokenizer does not know 'zebra': the model cannot "
                                                        "read it. Its vocabulary is these 64 words and signs: ' , . :"),
    ("unknown words", ["--prompt", "zebra unicorn?"], "does not know 'zebra', 'unicorn': the model cannot read them."),
    ("seed too big", ["--prompt", "what colour", "--seed", str(2**64)], "--seed must be in [0, 2**64), got 1844"),
    ("negative seed", ["--prompt", "what colour", "--seed", "-1"], "--seed must be in [0, 2**64), got -1"),
    ("prune seed too big", ["--prompt", "what colour", "--prune", "random", "--prune-seed", str(2**70)],
     "--prune-seed must be in [0, 2**64)"),
    ("fastv and prune", ["--prompt", "what colour", "--prune", "dart", "--fastv-k", "2", "--fastv-ratio", "0.5"],
     "--fastv-k and --fastv-ratio are FastV's own spelling and cannot be mixed with --prune"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_cli_generate_errors(cli, case, extra, message):
    run, model, image = cli
    code, err = run("generate", "--model", model, "--image", image, *extra)
    assert code == 2 and message in err and "Traceback" not in err, err


def test_cli_bad_image_and_model(cli, tmp_path):
    run, model, image = cli
    (tmp_path / "fake.png").write_text("text")
    code, err = run("generate", "--model", model, "--image", tmp_path / "fake.png", "--prompt", "what colour")
    assert code == 2 and "fake.png: not a readable image" in err
    code, err = run("generate", "--model", tmp_path / "nothing", "--image", image, "--prompt", "what colour")
    assert code == 2 and "nothing: checkpoint directory not found" in err


def test_cli_names_what_was_expected(cli, tmp_path):
    run, model, image = cli
    code, err = run("generate", "--model", model, "--image", tmp_path, "--prompt", "what colour")
    assert code == 2 and "a directory; pass an image file" in err
    code, err = run("generate", "--model", image, "--image", image, "--prompt", "what colour")
    assert code == 2 and "a file; a checkpoint is a directory" in err
    wide = tmp_path / "wide.png"
    Image.new("RGB", (20000, 10)).save(wide)
    code, err = run("generate", "--model", model, "--image", wide, "--prompt", "what colour")
    assert code == 2 and "wide.png: image is 20000x10" in err, err
    code, err = run("analyze", "--model", model, "--image", image, "--image", image, "--prompt", "what colour",
                    "--out-dir", tmp_path / "a")
    assert code == 2 and "analyze looks at one image or one video, got 2 (--image, --video)" in err, err


def test_an_unconverted_checkpoint_says_how_to_convert_it(cli, hf_source, tmp_path):
    run, model, image = cli
    code, err = run("generate", "--model", hf_source, "--image", image, "--prompt", "what colour")
    assert code == 2 and f"python convert_weights.py {hf_source} weights/NAME" in err, err
    code, err = run("convert", model, tmp_path / "again")
    assert code == 2 and "already a minifastv checkpoint" in err and not (tmp_path / "again").exists(), err


def test_files_where_directories_belong_and_what_to_pass_to_replace(cli, tmp_path):
    """A file given as a conversion or quantization source, an --out-dir under a file, an output that
    exists, and int4 groups that do not fit: one line each, saying what to do."""
    run, model, image = cli
    for command in (["convert", image, tmp_path / "out"], ["quantize", image, tmp_path / "out", "--method", "int8"]):
        code, err = run(*command)
        assert code == 2 and f"{image}: a file; the source is a checkpoint directory" in err, err
    code, err = run("analyze", "--model", model, "--image", image, "--prompt", "what colour", "--out-dir",
                    image / "pictures")
    assert code == 2 and f"--out-dir is under {image}, a file, not a directory" in err, err
    code, err = run("quantize", model, tmp_path, "--method", "int8")
    assert code == 2 and "already exists (--force on the command line, overwrite=True in Python" in err, err
    code, err = run("quantize", model, tmp_path / "q4", "--method", "int4")
    assert code == 2 and "group sizes that divide this model's widths: 32" in err and not (tmp_path / "q4").exists()


def test_capitals_read_as_the_lower_case_words_the_tiny_model_knows():
    tok = minifastv.load_tokenizer(TINY_MODEL)
    assert tok.encode_prompt("What colour is the Circle?") == tok.encode_prompt("what colour is the circle?")
    with pytest.raises(ValueError, match="does not know 'zebra', 'unicorn'"):
        tok.encode_prompt("zebra unicorn?")


def test_pixels_without_a_batch_dimension_say_so(tiny):
    with pytest.raises(ValueError, match=r"one image needs a batch dimension: pixels\[None\]"):
        generate(tiny.model, prompt_ids(tiny), pixels(1)[0], max_new_tokens=1)


def test_cli_analyze_output_under_a_file(cli, tmp_path):
    run, model, image = cli
    (tmp_path / "afile").write_text("x")
    code, err = run("analyze", "--model", model, "--image", image, "--prompt", "what colour", "--out-dir", tmp_path / "afile")
    assert code == 2 and "afile" in err and "Traceback" not in err, err


# --- randomized ----------------------------------------------------------------------------------------

DOCUMENTED = ("image placeholder(s)", "more than the context", "+ max_new_tokens", "max_new_tokens must be",
              "the tokenizer does not know",
              "FastV k must be", "FastV ratio must be", "FastV prunes image tokens", "input_ids is empty")


def test_random_prompts_and_images_answer_or_raise_documented_errors():
    """Random prompts (empty, gibberish, overlong, stray <image> markers), images of random size and pixel
    format, FastV settings and token budgets fed to the shipped tiny model: every trial either answers with
    1..max_new_tokens vocabulary tokens or raises a ValueError from the documented list."""
    model = Pipeline.load(TINY_MODEL, dtype=None)
    cfg = model.model.config
    words = sorted(model.tokenizer.tok.get_vocab()) + ["zebra", "<image>", "?", "\n"]  # its order varies by process
    rng = random.Random(0)
    outcomes = {"answered": 0, "refused": 0}
    for trial in range(60):
        n_images = rng.choice([0, 1, 1, 1, 2, 3])
        n_markers = n_images if rng.random() < 0.7 else rng.randint(0, 3)
        question = " ".join(rng.choices(words, k=rng.choice([0, 1, 5, 20, 300])))
        images = [Image.new(rng.choice(["RGB", "L", "P", "RGBA", "1"]),
                            (rng.randint(1, 300), rng.randint(1, 300)), rng.randint(0, 255)) for _ in range(n_images)]
        max_new = rng.choice([-1, 0, 1, 3, 8, 600])
        try:
            fastv = None if rng.random() < 0.3 else FastV(rng.randint(0, 5), rng.choice([0.0, 0.5, 0.9, 1.0]))
            ids = torch.tensor([model.tokenizer.encode_prompt(chat_prompt(question, n_images=n_markers))])
            px = torch.stack([preprocess(im, cfg.vision.image_size, cfg.image_mode) for im in images]) if images else None
            out = generate(model.model, ids, px, max_new_tokens=max_new, prune=fastv, eos_token_id=cfg.text.eos_token_id)
        except ValueError as e:
            assert any(fragment in str(e) for fragment in DOCUMENTED), f"trial {trial}: undocumented error {e!r}"
            outcomes["refused"] += 1
        else:
            assert out.shape[0] == 1 and 1 <= out.shape[1] <= max_new, f"trial {trial}"
            assert ((out >= 0) & (out < cfg.text.vocab_size)).all()
            outcomes["answered"] += 1
    assert min(outcomes.values()) >= 10, outcomes


@pytest.mark.parametrize("section, field, value", [
    ("text", "n_layers", 10**9), ("text", "dim", 2**40), ("text", "vocab_size", 10**12),
    ("vision", "n_layers", 10**8), ("vision", "image_size", 10**6), ("text", "intermediate_size", 10**10),
])
def test_absurd_sizes_are_refused_before_anything_is_built(saved, section, field, value):
    """A damaged config.json with a size beyond any real model is a clear error at once (the model would
    otherwise be built layer by layer first: a billion layers take minutes)."""
    import time

    config = json.loads((saved / "config.json").read_text())
    config[section][field] = value
    (saved / "config.json").write_text(json.dumps(config))
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=f"{field} is {value}, beyond any real model"):
        minifastv.load(saved)
    assert time.perf_counter() - start < 5
