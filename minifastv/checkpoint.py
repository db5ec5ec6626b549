"""minifastv's checkpoint format: a directory with

    config.json                     LlavaConfig.to_dict()
    model.safetensors               all weights, or, past max_shard_bytes,
    model-0000i-of-0000n.safetensors + model.safetensors.index.json  ({"weight_map": {name: file}})
    tokenizer.json                  a `tokenizers` tokenizer

`load` builds the model on the meta device and assigns the tensors read from the files, so weights are
never held twice. `save` writes into a temporary sibling directory and renames it into place, so a failed
or interrupted save leaves no directory that `load` would accept.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import ConfigError, LlavaConfig
from .llava import LlavaModel
from .tokenizer import Tokenizer

CONFIG, WEIGHTS, INDEX, TOKENIZER = "config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CheckpointError(ValueError):
    """A checkpoint file is missing, malformed, or does not match the config."""


def parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def read_json(file: Path) -> dict:
    if not file.is_file():
        raise FileNotFoundError(f"{file}: file not found")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def load_config(path: str | Path) -> LlavaConfig:
    file = Path(path) / CONFIG
    try:
        return LlavaConfig.from_dict(read_json(file))
    except ConfigError as e:
        raise CheckpointError(f"{file}: {e}") from None


SAFETENSORS = (WEIGHTS, INDEX)
PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json")  # transformers' older format, for conversion


def weight_files(path: Path, formats=(SAFETENSORS,)) -> list[Path]:
    """A checkpoint directory's weight files: those its index lists, or its single file."""
    for single, index in formats:
        if (path / index).is_file():
            weight_map = read_json(path / index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{path / index}: no 'weight_map' object")
            return [path / f for f in dict.fromkeys(weight_map.values())]
        if (path / single).is_file():
            return [path / single]
    raise FileNotFoundError(f"{path}: no {' or '.join(n for fmt in formats for n in fmt)} found")


def read_tensors(file: Path, device="cpu"):
    """Yield (name, tensor) from a .safetensors file or a pickled .bin, one tensor at a time.

    .bin files are read with weights_only=True, so a pickle that tries to run code is refused, and with
    mmap=True, so a shard is paged in as its tensors are used rather than read whole.
    """
    if not file.is_file():
        raise FileNotFoundError(f"{file}: weight file not found")
    if file.suffix != ".bin":
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
        return
    try:
        state = torch.load(file, map_location=device, weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(f"{file}: refused or unreadable, only plain tensor files are loaded "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: expected a dict of tensors, got {type(state).__name__}")
    for name in list(state):
        yield name, state.pop(name)


def check_state(state: dict, model: torch.nn.Module, where: str):
    """Exactly the model's tensor names, with the model's shapes."""
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing:
        raise CheckpointError(f"{where}: missing weight(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        raise CheckpointError(f"{where}: unexpected weight(s) {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(f"{where}: {name} has shape {list(tensor.shape)}, "
                                  f"the config implies {list(expected[name].shape)}")
        if not tensor.is_floating_point():
            raise CheckpointError(f"{where}: {name} has dtype {tensor.dtype}, expected floating point")
        if not tensor.isfinite().all():
            raise CheckpointError(f"{where}: {name} contains NaN or infinite values")


def from_state_dict(config: LlavaConfig, state: dict, *, dtype=None, where: str = "state dict") -> LlavaModel:
    """Build on the meta device and adopt the given tensors (no copy unless dtype asks for a cast)."""
    with torch.device("meta"):
        model = LlavaModel(config)
    check_state(state, model, where)
    dtype = parse_dtype(dtype)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    model.load_state_dict(state, assign=True)
    return model.eval()


def load(path: str | Path, *, dtype=None, device="cpu") -> LlavaModel:
    """Load a minifastv checkpoint directory; dtype None keeps the stored dtype."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: checkpoint directory not found")
    dtype = parse_dtype(dtype)
    config = load_config(path)
    state = {}
    for file in weight_files(path):
        state.update(read_tensors(file, device))
    model = from_state_dict(config, state, dtype=dtype, where=str(path))
    if not (path / TOKENIZER).is_file():
        raise FileNotFoundError(f"{path / TOKENIZER}: file not found")
    text = config.text
    model.tokenizer = Tokenizer.from_file(path / TOKENIZER, bos_token_id=text.bos_token_id,
                                          eos_token_id=text.eos_token_id, image_token_id=config.image_token_id)
    return model


class ShardWriter:
    """Streams tensors into safetensors shards of at most max_shard_bytes (a lone larger tensor gets its own),
    so a writer never holds more than one shard. Shards get their final names in `close`, when the count is
    known: model.safetensors if there is one, model-0000i-of-0000n.safetensors plus an index otherwise."""

    def __init__(self, directory: Path, max_shard_bytes: int = 2 << 30):
        self.dir, self.max_shard_bytes = Path(directory), max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []

    def add(self, name: str, tensor: torch.Tensor):
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_shard_bytes:
            self.flush()
        self.pending[name] = tensor.detach().contiguous().cpu()
        self.pending_bytes += nbytes

    def flush(self):
        file = self.dir / f"shard-{len(self.written):05d}.partial"
        save_file(self.pending, str(file), metadata={"format": "pt"})
        self.written.append((file, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self):
        if self.pending or not self.written:
            self.flush()
        if len(self.written) == 1:
            os.replace(self.written[0][0], self.dir / WEIGHTS)
            return
        weight_map, n = {}, len(self.written)
        for i, (file, names) in enumerate(self.written, 1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(file, self.dir / final)
            weight_map.update(dict.fromkeys(names, final))
        (self.dir / INDEX).write_text(json.dumps({"weight_map": weight_map}, indent=2) + "\n")


def staging_dir(path: Path, overwrite: bool) -> Path:
    """A fresh hidden sibling of `path` to write into before `publish` renames it into place."""
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists (pass overwrite=True / --force to replace it)")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NotADirectoryError(f"{path}: cannot create it, {ancestor} is a file, not a directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    except OSError as e:
        raise type(e)(e.errno, f"{path}: cannot write the output directory here ({e.strerror})") from None


def save(model: LlavaModel, path: str | Path, *, max_shard_bytes: int = 2 << 30, overwrite: bool = False) -> Path:
    """Write `model` (and its tokenizer) as a checkpoint directory, atomically."""
    path = Path(path)
    if model.tokenizer is None:
        raise ValueError("the model has no tokenizer to save; set model.tokenizer first")
    tmp = staging_dir(path, overwrite)
    try:
        (tmp / CONFIG).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
        model.tokenizer.tok.save(str(tmp / TOKENIZER))
        writer = ShardWriter(tmp, max_shard_bytes)
        for name, tensor in model.state_dict().items():
            writer.add(name, tensor)
        writer.close()
        publish(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def publish(tmp: Path, path: Path):
    """Move a finished directory into place; an existing one is swapped out only after the new one is complete."""
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
