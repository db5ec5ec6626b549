"""Files: safetensors read tensor by tensor and written with aligned tensors, sharding, and directories
written in a hidden sibling and renamed into place, so an interrupted write leaves nothing half-made."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"


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


def check_stored(name: str, shape, dtype: torch.dtype, expected: torch.Tensor, exact: bool, where):
    """A stored tensor has the shape the config implies and a dtype the model can use: any float dtype for
    float weights (they are cast), exactly the expected one for quantized weights, scales and zero points."""
    if tuple(shape) != tuple(expected.shape):
        raise CheckpointError(f"{where}: {name} has shape {list(shape)}, the config implies {list(expected.shape)}")
    if exact and dtype != expected.dtype:
        raise CheckpointError(f"{where}: {name} has dtype {dtype}, expected {expected.dtype}")
    if not exact and not dtype.is_floating_point:
        raise CheckpointError(f"{where}: {name} has dtype {dtype}, expected floating point")


def write_safetensors(tensors: dict[str, torch.Tensor], file: Path, metadata: dict[str, str] | None = None):
    """Write a safetensors file in which every tensor whose size is a multiple of 64 bytes (all weight
    matrices of real models) starts at a 64-byte offset: those come first, after a header padded with spaces,
    and the rest follow by descending element size, so each stays aligned to its own element size."""
    order = sorted(tensors, key=lambda n: (tensors[n].nbytes % ALIGNMENT != 0, -tensors[n].element_size()))
    header, offset = {"__metadata__": {"format": "pt", **(metadata or {})}}, 0
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


def source_dir(path: Path, what: str) -> Path:
    """`path` if it is a directory; else an error that says what it is instead (`what`: "source checkpoint")."""
    if path.is_file():
        raise NotADirectoryError(f"{path}: a file; the source is a checkpoint directory (config.json and weights)")
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: {what} directory not found")
    return path


def staging_dir(path: Path, overwrite: bool) -> Path:
    """A fresh hidden sibling of `path` to write into before `publish` renames it into place."""
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists (--force on the command line, overwrite=True in Python, "
                              "replaces it)")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NotADirectoryError(f"{path}: cannot create it, {ancestor} is a file, not a directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private (0700); the result is the user's
        return tmp
    except OSError as e:
        raise type(e)(e.errno, f"{path}: cannot write the output directory here ({e.strerror})") from None


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


@contextmanager
def staged(path: Path, overwrite: bool):
    """Write a directory atomically: the block fills the yielded temporary sibling, which then replaces
    `path`; if the block fails, the sibling is removed and `path` is untouched."""
    tmp = staging_dir(path, overwrite)
    try:
        yield tmp
        publish(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
