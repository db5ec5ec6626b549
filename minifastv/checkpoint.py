"""minifastv's checkpoint format: a directory with

    config.json                     LlavaConfig.to_dict()
    model.safetensors               all weights, or, past max_shard_bytes,
    model-0000i-of-0000n.safetensors + model.safetensors.index.json  ({"weight_map": {name: file}})
    tokenizer.json                  a `tokenizers` tokenizer

`load` builds the model on the meta device and assigns the tensors, memory-mapped from the files where they
are used as stored, so weights are never read or held twice. Quantized checkpoints (minifastv/quant.py) add
`quant` to config.json and store each quantized linear as weight + scale (+ zero). `save` writes into a temporary sibling directory and renames it into place, so a failed
or interrupted save leaves no directory that `load` would accept.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .config import ConfigError, LlavaConfig, QuantConfig
from .llava import LlavaModel, empty_model
from .machine import parse_dtype, release_free_memory, resolve_device, resolve_dtype
from .quant import Int4Linear, Int8Linear, pack_for_device, quantized_modules, quantized_tensors
from .tokenizer import Tokenizer

CONFIG, WEIGHTS, INDEX, TOKENIZER = "config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json"


class CheckpointError(ValueError):
    """A checkpoint file is missing, malformed, or does not match the config."""


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


# safetensors' dtype names (from a file's header, read without loading the tensor)
STORED_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                 "BOOL": torch.bool}
STORED_NAMES = {dtype: name for name, dtype in STORED_DTYPES.items()}


ALIGNMENT = 64  # bytes: where `save` starts tensors, so that mapped weights suit aligned vector loads


def write_safetensors(tensors: dict[str, torch.Tensor], file: Path):
    """Write a safetensors file in which every tensor whose size is a multiple of 64 bytes (all weight
    matrices of real models) starts at a 64-byte offset: those come first, after a header padded with spaces,
    and the rest follow by descending element size, so each stays aligned to its own element size."""
    order = sorted(tensors, key=lambda n: (tensors[n].nbytes % ALIGNMENT != 0, -tensors[n].element_size()))
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in order:
        t = tensors[name]
        header[name] = {"dtype": STORED_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % ALIGNMENT)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name in order:
            t = tensors[name].contiguous()
            if t.nbytes:
                f.write((ctypes.c_ubyte * t.nbytes).from_address(t.data_ptr()))  # the tensor's bytes, not copied


def read_header(file: Path) -> tuple[int, dict]:
    """Where a safetensors file's data starts, and its header (safe_open has validated it)."""
    with open(file, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        return 8 + size, json.loads(f.read(size))


def read_into_memory(file: Path, data_start: int, header: dict, name: str) -> torch.Tensor:
    """One tensor read from the file into new memory (torch allocates it 64-byte aligned), not mapped."""
    entry = header[name]
    begin, end = entry["data_offsets"]
    raw = torch.empty(end - begin, dtype=torch.uint8)
    with open(file, "rb") as f:
        f.seek(data_start + begin)
        if end > begin and f.readinto((ctypes.c_ubyte * (end - begin)).from_address(raw.data_ptr())) != end - begin:
            raise CheckpointError(f"{file}: {name} is truncated")
    return raw.view(STORED_DTYPES[entry["dtype"]]).view(entry["shape"])


def check_stored(name: str, shape, dtype: torch.dtype, expected: torch.Tensor, exact: bool, where):
    """A stored tensor has the shape the config implies and a dtype the model can use: any float dtype for
    float weights (they are cast), exactly the expected one for quantized weights, scales and zero points."""
    if tuple(shape) != tuple(expected.shape):
        raise CheckpointError(f"{where}: {name} has shape {list(shape)}, the config implies {list(expected.shape)}")
    if exact and dtype != expected.dtype:
        raise CheckpointError(f"{where}: {name} has dtype {dtype}, expected {expected.dtype}")
    if not exact and not dtype.is_floating_point:
        raise CheckpointError(f"{where}: {name} has dtype {dtype}, expected floating point")


def check_finite(name: str, tensor: torch.Tensor, where):
    if tensor.is_floating_point() and not tensor.isfinite().all():
        raise CheckpointError(f"{where}: {name} contains NaN or infinite values")


def read_checkpoint(path: Path, model: LlavaModel, dtype: torch.dtype | None, device: torch.device,
                    check: bool) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint at `path`, checked against `model` (built on the meta device).

    A tensor used as stored is memory-mapped: the OS reads it on first use and may drop it again under memory
    pressure. A tensor that will be transformed (cast to another dtype, or int4 repacked for the CPU kernel)
    is read into memory instead, and the read copy is freed once transformed, so no weight is held twice (a
    file's mapping, with every page read through it, lives as long as any tensor mapped from it). So is an
    int8 weight that the file does not place on a 64-byte boundary (files written by `save` do): torch's int8
    kernel reads its weight with aligned vector loads. Quantized tensors keep their stored dtype, and so do
    lookup tables (embeddings) unless `dtype` is narrower: their rows are cast when looked up, so an fp16 table
    need not take twice the memory on a machine that computes in fp32.
    """
    expected = model.state_dict()
    exact = {name for name, _ in model.named_buffers()}  # a LlavaModel's only buffers are quantized tensors
    linears = quantized_modules(model)
    aligned = {f"{name}.weight" for name, m in linears if isinstance(m, Int8Linear)}
    repacked = {f"{name}.{b}" for name, m in linears if isinstance(m, Int4Linear) and device.type == "cpu"
                for b in ("weight", "scale", "zero")}
    tables = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, torch.nn.Embedding)}
    state = {}
    for file in weight_files(path):
        if not file.is_file():
            raise FileNotFoundError(f"{file}: weight file not found")
        header = None
        try:
            with safe_open(str(file), "pt") as mapped:
                for name in mapped.keys():
                    if name not in expected:
                        raise CheckpointError(f"{file}: unexpected weight(s) [{name!r}], not part of a model "
                                              "with this config.json")
                    info = mapped.get_slice(name)
                    stored = STORED_DTYPES.get(info.get_dtype())
                    if stored is None:
                        raise CheckpointError(f"{file}: {name} has unsupported dtype {info.get_dtype()}")
                    check_stored(name, info.get_shape(), stored, expected[name], name in exact, file)
                    keep = dtype is None or name in exact or name in tables and stored.itemsize <= dtype.itemsize
                    target = stored if keep else dtype
                    tensor = mapped.get_tensor(name)  # a view of the mapping: nothing is read yet
                    if target != stored or name in repacked or name in aligned and tensor.data_ptr() % ALIGNMENT:
                        header = header or read_header(file)
                        tensor = read_into_memory(file, *header, name)
                    tensor = tensor.to(device=device, dtype=target)
                    if check:
                        check_finite(name, tensor, file)
                    state[name] = tensor
        except SafetensorError as e:
            raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{path}: missing weight(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return state


def load(path: str | Path, *, dtype="auto", device="cpu", check: bool = False) -> LlavaModel:
    """Load a minifastv checkpoint directory.

    dtype: "auto" (bf16 where the device computes it natively, else fp32; see machine.auto_dtype), a dtype name,
    or None to keep the stored dtype. It applies to float weights; quantized weights keep their stored form.
    check: also scan every weight for NaN and infinity (conversion and quantization already did, so by
    default loading does not read the weights at all: they are memory-mapped).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: checkpoint directory not found")
    device = resolve_device(device)
    dtype, _ = resolve_dtype(dtype, device)
    config = load_config(path)
    if not (path / TOKENIZER).is_file():
        raise FileNotFoundError(f"{path / TOKENIZER}: file not found")
    model = empty_model(config)
    model.load_state_dict(read_checkpoint(path, model, dtype, device, check), assign=True)
    pack_for_device(model)
    release_free_memory()
    text = config.text
    model.tokenizer = Tokenizer.from_file(path / TOKENIZER, bos_token_id=text.bos_token_id,
                                          eos_token_id=text.eos_token_id, image_token_id=config.image_token_id)
    return model.eval()


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
        write_safetensors(self.pending, file)
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


def quantize_checkpoint(src: str | Path, out: str | Path, quant: QuantConfig, *, overwrite: bool = False,
                        max_shard_bytes: int = 2 << 30, log=lambda msg: print(msg, file=sys.stderr)) -> Path:
    """Write a weight-only quantized copy of the float checkpoint `src` at `out` (minifastv/quant.py), reading
    and writing one tensor at a time; every weight is checked for NaN and infinity on the way."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: checkpoint directory not found")
    config = load_config(src)
    if config.quant is not None:
        raise CheckpointError(f"{src / CONFIG}: the checkpoint is already quantized ({config.quant.method}); "
                              "quantize a float checkpoint")
    try:
        quantized = dataclasses.replace(config, quant=quant)
    except ConfigError as e:
        raise CheckpointError(f"{src / CONFIG}: {e}") from None
    if not (src / TOKENIZER).is_file():
        raise FileNotFoundError(f"{src / TOKENIZER}: file not found")
    expected = empty_model(config).state_dict()
    tmp = staging_dir(out, overwrite)
    try:
        writer, seen = ShardWriter(tmp, max_shard_bytes), set()
        for file in weight_files(src):
            start = time.perf_counter()
            for name, tensor in read_tensors(file):
                if name not in expected:
                    raise CheckpointError(f"{file}: unexpected weight(s) [{name!r}], not part of a model with "
                                          "this config.json")
                check_stored(name, tensor.shape, tensor.dtype, expected[name], False, file)
                check_finite(name, tensor, file)
                for stored_name, stored in quantized_tensors(name, tensor, quant):
                    writer.add(stored_name, stored)
                seen.add(name)
            log(f"{file.name}: quantized in {time.perf_counter() - start:.1f}s")
        missing = sorted(set(expected) - seen)
        if missing:
            raise CheckpointError(f"{src}: missing weight(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        writer.close()
        (tmp / CONFIG).write_text(json.dumps(quantized.to_dict(), indent=2) + "\n")
        shutil.copyfile(src / TOKENIZER, tmp / TOKENIZER)
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {out} ({quant.method}{'' if quant.group_size is None else f', groups of {quant.group_size}'})")
    return out
