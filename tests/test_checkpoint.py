"""minifastv's own checkpoint format: exact round trips, sharding, and errors that name the file."""

import json

import pytest
import torch
from helpers import random_pixels, random_prompt

import minifastv
from minifastv.checkpoint import CheckpointError
from minifastv.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def model(twin):
    return twin(n_kv_heads=2, seed=9)[1]


@pytest.fixture(scope="module")
def tok(tokenizer_json):
    return Tokenizer.from_file(tokenizer_json, bos_token_id=1, eos_token_id=2, image_token_id=127)


@pytest.fixture
def saved(model, tok, tmp_path):
    return minifastv.save(model, tok, tmp_path / "ckpt")


def assert_same_model(a, b):
    assert a.config == b.config
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("max_shard_bytes", [2 << 30, 20_000], ids=["single-file", "sharded"])
def test_round_trip_is_exact(model, tok, tmp_path, max_shard_bytes):
    path = minifastv.save(model, tok, tmp_path / "ckpt", max_shard_bytes=max_shard_bytes)
    sharded = (path / "model.safetensors.index.json").exists()
    assert sharded == (max_shard_bytes == 20_000)
    assert sharded == (not (path / "model.safetensors").exists())
    loaded = minifastv.load(path, dtype=None)
    assert_same_model(model, loaded)
    prompt = "USER: <image>\nwhat colour is the square"
    assert minifastv.load_tokenizer(path).encode_prompt(prompt) == tok.encode_prompt(prompt)
    ids = torch.tensor([random_prompt(torch.Generator().manual_seed(0), 5, [2])])
    with torch.no_grad():
        assert torch.equal(loaded(ids, random_pixels(1)), model(ids, random_pixels(1)))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary directories left behind"


def test_load_with_dtype(saved):
    loaded = minifastv.load(saved, dtype="bfloat16")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in loaded.parameters())


def test_save_does_not_clobber(model, tok, saved):
    with pytest.raises(FileExistsError, match="ckpt: already exists"):
        minifastv.save(model, tok, saved)
    minifastv.save(model, tok, saved, overwrite=True)
    assert_same_model(model, minifastv.load(saved, dtype=None))


def test_failed_save_leaves_nothing(model, tok, tmp_path, monkeypatch):
    import minifastv.files as files

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(files, "write_safetensors", boom)
    with pytest.raises(OSError, match="disk full"):
        minifastv.save(model, tok, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def break_config(path):
    (path / "config.json").write_text("{\"text\": {\"dim\": ")


def bad_field(path):
    cfg = json.loads((path / "config.json").read_text())
    cfg["text"]["n_headz"] = 4
    (path / "config.json").write_text(json.dumps(cfg))


def wrong_dim(path):
    cfg = json.loads((path / "config.json").read_text())
    cfg["text"]["intermediate_size"] = 100
    (path / "config.json").write_text(json.dumps(cfg))


def truncate_weights(path):
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])


def garbage_header(path):
    (path / "model.safetensors").write_bytes(b"\xff" * 64)


@pytest.mark.parametrize("damage, error, message", [
    (lambda p: (p / "config.json").unlink(), FileNotFoundError, r"config\.json: file not found"),
    (break_config, CheckpointError, r"config\.json: not valid JSON"),
    (bad_field, CheckpointError, r"config\.json: text: unknown field\(s\) \['n_headz'\]"),
    (wrong_dim, CheckpointError, r"ckpt/model\.safetensors: llm\.layers\.0\.mlp\.down_proj\.weight has shape \[64, 96\], the config implies \[64, 100\]"),
    (lambda p: (p / "model.safetensors").unlink(), FileNotFoundError, r"no model\.safetensors"),
    (truncate_weights, CheckpointError, r"model\.safetensors: not a readable safetensors file"),
    (garbage_header, CheckpointError, r"model\.safetensors: not a readable safetensors file"),
    (lambda p: (p / "tokenizer.json").unlink(), FileNotFoundError, r"tokenizer\.json: file not found"),
    (lambda p: (p / "tokenizer.json").write_text("[]"), ValueError, r"tokenizer\.json: not a valid tokenizer\.json"),
], ids=["no-config", "config-not-json", "config-unknown-field", "config-vs-tensors", "no-weights",
        "truncated-weights", "garbage-weights", "no-tokenizer", "bad-tokenizer"])
def test_damaged_checkpoint_names_the_file(saved, damage, error, message):
    damage(saved)
    with pytest.raises(error, match=message):
        minifastv.Pipeline.load(saved)  # the model and its tokenizer


def test_missing_and_extra_weights(model, tok, tmp_path):
    from safetensors.torch import load_file, save_file

    path = minifastv.save(model, tok, tmp_path / "ckpt")
    state = load_file(path / "model.safetensors")
    del state["llm.norm.weight"]
    save_file(state, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing weight\(s\) \['llm\.norm\.weight'\]"):
        minifastv.load(path)
    state["llm.norm.weight"] = torch.ones(64)
    state["llm.extra"] = torch.ones(1)
    save_file(state, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected weight\(s\) \['llm\.extra'\]"):
        minifastv.load(path)


def test_missing_shard_is_named(model, tok, tmp_path):
    path = minifastv.save(model, tok, tmp_path / "ckpt", max_shard_bytes=20_000)
    shard = sorted(path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"{shard.name}: weight file not found"):
        minifastv.load(path)


def test_not_a_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere: checkpoint directory not found"):
        minifastv.load(tmp_path / "nowhere")


def test_bad_dtype_name(saved):
    with pytest.raises(ValueError, match="unknown dtype 'float64'; choose one of auto, float32, float16, bfloat16"):
        minifastv.load(saved, dtype="float64")


def mapped_ranges(file) -> list[tuple[int, int]]:
    """Address ranges of this process's memory mappings of `file` (Linux /proc/self/maps)."""
    ranges = []
    for line in open("/proc/self/maps"):
        fields = line.split()
        if len(fields) >= 6 and fields[5] == str(file):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def test_weights_used_as_stored_are_mapped_and_converted_ones_read(saved):
    file = (saved / "model.safetensors").resolve()
    as_stored = minifastv.load(saved, dtype=None)
    ranges = mapped_ranges(file)
    in_file = lambda t: any(a <= t.data_ptr() < b for a, b in ranges)  # noqa: E731
    assert ranges and all(in_file(t) for t in as_stored.state_dict().values())
    converted = minifastv.load(saved, dtype="bfloat16")
    assert not any(in_file(t) for t in converted.state_dict().values())


def test_saved_tensors_start_on_64_byte_boundaries(saved):
    from minifastv.checkpoint import ALIGNMENT, read_header

    start, header = read_header(saved / "model.safetensors")
    offsets = [start + e["data_offsets"][0] for name, e in header.items() if name != "__metadata__"]
    sizes = [e["data_offsets"][1] - e["data_offsets"][0] for name, e in header.items() if name != "__metadata__"]
    assert all(o % ALIGNMENT == 0 for o, n in zip(offsets, sizes) if n % ALIGNMENT == 0)
    assert len(header) - 1 == len(minifastv.load(saved, dtype=None).state_dict())


def test_written_checkpoints_get_the_users_permissions(model, tok, tmp_path):
    """Not the 0700 of a temporary directory: what the user's umask gives any new directory and file."""
    import os

    from minifastv.files import current_umask

    old = os.umask(0o022)
    try:
        path = minifastv.save(model, tok, tmp_path / "ckpt")
        assert current_umask() == 0o022
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777) == 0o755
    assert {f.stat().st_mode & 0o777 for f in path.iterdir()} == {0o644}
