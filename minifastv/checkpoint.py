"""minifastv's checkpoint format: a directory with

    config.json                     LlavaConfig.to_dict()
    model.safetensors               all weights, or, past max_shard_bytes,
    model-0000i-of-0000n.safetensors + model.safetensors.index.json  ({"weight_map": {name: file}})
    tokenizer.json                  a `tokenizers` tokenizer

`load` builds the model on the meta device and assigns the tensors, memory-mapped from the files where they
are used as stored, so weights are never read or held twice. Quantized checkpoints (minifastv/quant/) add
`quant` to config.json and store each quantized linear as weight + scale (+ zero). `save` writes into a
temporary sibling directory and renames it into place (files.py), so a failed or interrupted save leaves no
directory that `load` would accept.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .config import ClipTextConfig, ConfigError, LlavaConfig, QuantConfig, TextConfig, VisionConfig
from .files import (ALIGNMENT, STORED_DTYPES, CheckpointError, ShardWriter, check_stored, read_header, read_into_memory,
                    read_json, read_tensors, source_dir, staged, weight_files)
from .machine import release_free_memory, resolve_device, resolve_dtype
from .models import FAMILIES, LlavaModel
from .quant import (Int4Linear, Int8Linear, choose_kernels, pack_for_device, quantized_modules, quantized_tensors,
                    read_cpu_layout, replace_linears, use_cpu_layout)
from .tokenizer import Tokenizer

CONFIG, TOKENIZER = "config.json", "tokenizer.json"
CLIP_TOKENIZER = "clip_tokenizer.json"   # CLIP's tokenizer, beside a CLIP text tower (config.clip_text)



# Far beyond any real model (LLaMA-3-405B: 126 layers, width 16384, FFN 53248, 128K vocabulary): a config.json
# past these is damaged, and is refused before a model is built from it (a billion layers would take minutes).
LIMITS = {"n_layers": 1024, "n_heads": 1024, "n_kv_heads": 1024, "dim": 1 << 17, "intermediate_size": 1 << 19,
          "vocab_size": 1 << 22, "image_size": 8192, "patch_size": 8192, "max_seq_len": 1 << 24, "n_positions": 1 << 16,
          "projection_dim": 1 << 17}
MAX_PATCHES = 1 << 16


def config_from_dict(d: dict) -> LlavaConfig:
    """The LlavaConfig that a config.json holds, read strictly (the inverse of LlavaConfig.to_dict): unknown keys
    are errors, missing keys take the defaults, sizes beyond any real model are a damaged file."""
    d = dict(d)
    family = d.pop("family", "llava")
    if family not in FAMILIES:
        raise ConfigError(f"unknown model family {family!r}; families: {', '.join(FAMILIES)}")
    vision = _build(VisionConfig, d.pop("vision", {}), "vision")
    if vision.n_patches > MAX_PATCHES:
        raise ConfigError(f"vision: {vision.grid}^2 patches per image, beyond any real model: the config is damaged")
    text = _build(TextConfig, d.pop("text", {}), "text")
    quant = d.pop("quant", None)
    quant = None if quant is None else _build(QuantConfig, quant, "quant")
    clip_text = d.pop("clip_text", None)
    clip_text = None if clip_text is None else _build(ClipTextConfig, clip_text, "clip_text")
    return _build(FAMILIES[family][0], d, "", vision=vision, text=text, quant=quant, clip_text=clip_text)


def _build(cls, d, where: str, **extra):
    if not isinstance(d, dict):
        raise ConfigError(f"{where or 'config'}: expected an object, got {type(d).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown field(s) {unknown}")
    for name, value in d.items():
        if isinstance(value, int) and not isinstance(value, bool) and value > LIMITS.get(name, value):
            raise ConfigError(f"{cls.__name__}.{name} is {value}, beyond any real model (at most {LIMITS[name]}): "
                              "the config is damaged")
    try:
        return cls(**d, **extra)
    except TypeError as e:  # e.g. a string where a number belongs, caught by the comparisons in __post_init__
        raise ConfigError(f"{where or 'config'}: {e}") from None


def empty_model(config: LlavaConfig) -> LlavaModel:
    """The model with meta tensors (no memory) for load_state_dict(..., assign=True) to fill, its decoder's
    linears quantized as the config says."""
    with torch.device("meta"):
        model = FAMILIES[config.family][1](config)
        if config.quant is not None:  # the same decoder, with quantized linears in place of nn.Linear
            replace_linears(model, config.quant)
    return model


def load_config(path: str | Path) -> LlavaConfig:
    file = Path(path) / CONFIG
    data = read_json(file)
    if "text" not in data and ("model_type" in data or "architectures" in data):  # a transformers config.json
        raise CheckpointError(f"{path}: a {data.get('model_type', 'transformers')} checkpoint, not converted to "
                              f"minifastv's format: run `python convert_weights.py {path} weights/NAME` (original "
                              "LLaVA checkpoints also need --vision-tower and --tokenizer), then use weights/NAME")
    try:
        return config_from_dict(data)
    except ConfigError as e:
        raise CheckpointError(f"{file}: {e}") from None


def check_finite(name: str, tensor: torch.Tensor, where):
    if tensor.is_floating_point() and not tensor.isfinite().all():
        raise CheckpointError(f"{where}: {name} contains NaN or infinite values")


def read_checkpoint(path: Path, model: LlavaModel, dtype: torch.dtype | None, device: torch.device,
                    check: bool, repack: bool = True) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint at `path`, checked against `model` (built on the meta device).

    A tensor used as stored is memory-mapped: the OS reads it on first use and may drop it again under memory
    pressure. A tensor that will be transformed (cast to another dtype, or int4 repacked for the CPU kernel)
    is read into memory instead (repack=False: int4 weights will be replaced by a packed file, so they are
    mapped and never read), and the read copy is freed once transformed, so no weight is held twice (a
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
                for b in ("weight", "scale", "zero")} if repack else set()
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

    dtype: "auto" (bf16 where the device computes it natively, else fp32, and fp32 for a model too small for bf16
    to pay on a CPU; see machine.auto_dtype), a dtype name,
    or None to keep the stored dtype. It applies to float weights; quantized weights keep their stored form.
    check: also scan every weight for NaN and infinity (conversion and quantization already did, so by
    default loading does not read the weights at all: they are memory-mapped).
    """
    path = Path(path)
    if path.is_file():
        raise NotADirectoryError(f"{path}: a file; a checkpoint is a directory (config.json, model.safetensors, "
                                 "tokenizer.json)")
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: checkpoint directory not found")
    device = resolve_device(device)
    config = load_config(path)
    dtype, _ = resolve_dtype(dtype, device, config)
    if not (path / TOKENIZER).is_file():
        raise FileNotFoundError(f"{path / TOKENIZER}: file not found")
    model = empty_model(config)
    packed = read_cpu_layout(path, model) if device.type == "cpu" else None  # int4: a packed file beside it
    model.load_state_dict(read_checkpoint(path, model, dtype, device, check, repack=packed is None), assign=True)
    if packed is not None:
        use_cpu_layout(model, packed)
    if model.clip_text is not None:   # it reads the instruction back from the prompt's ids, then tokenizes it as CLIP
        model.clip_text.tokenizers = (load_tokenizer(path), read_clip_tokenizer(path))
    pack_for_device(model)
    choose_kernels(model)   # a quantized model: the matmul each regime runs on this machine (cached, else probed)
    release_free_memory()
    return model.eval()


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a checkpoint directory, with the special ids its config.json gives."""
    path = Path(path)
    config = load_config(path)
    if not (path / TOKENIZER).is_file():
        raise FileNotFoundError(f"{path / TOKENIZER}: file not found")
    text = config.text
    return Tokenizer.from_file(path / TOKENIZER, bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id,
                               image_token_id=config.image_token_id,
                               **{name: getattr(config, name) for name in ("video_token_id", "frame_token_id",
                                                                           "n_frames", "template")
                                  if hasattr(config, name)})


def read_clip_tokenizer(path: Path):
    """CLIP's tokenizer (a `tokenizers` Tokenizer) beside a checkpoint's CLIP text tower."""
    file = path / CLIP_TOKENIZER
    if not file.is_file():
        raise FileNotFoundError(f"{file}: file not found (config.json has a CLIP text tower, which needs it)")
    return Tokenizer.from_file(file, bos_token_id=0, eos_token_id=0, image_token_id=-1).tok


def save(model: LlavaModel, tokenizer: Tokenizer, path: str | Path, *, max_shard_bytes: int = 2 << 30,
         overwrite: bool = False) -> Path:
    """Write `model` and its tokenizer as a checkpoint directory, atomically."""
    path = Path(path)
    if not isinstance(tokenizer, Tokenizer):
        raise TypeError(f"save(model, tokenizer, path): tokenizer must be a minifastv Tokenizer, got "
                        f"{type(tokenizer).__name__}")
    if model.clip_text is not None and model.clip_text.tokenizers is None:
        raise ValueError("save: the model's CLIP text tower has no CLIP tokenizer to write beside it; set "
                         "model.clip_text.tokenizers = (the decoder's Tokenizer, CLIP's tokenizers.Tokenizer)")
    with staged(path, overwrite) as tmp:
        (tmp / CONFIG).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
        tokenizer.tok.save(str(tmp / TOKENIZER))
        if model.clip_text is not None:
            model.clip_text.tokenizers[1].save(str(tmp / CLIP_TOKENIZER))
        writer = ShardWriter(tmp, max_shard_bytes)
        for name, tensor in model.state_dict().items():
            writer.add(name, tensor)
        writer.close()
    return path


def quantize_checkpoint(src: str | Path, out: str | Path, quant: QuantConfig, *, overwrite: bool = False,
                        max_shard_bytes: int = 2 << 30, log=lambda msg: print(msg, file=sys.stderr)) -> Path:
    """Write a weight-only quantized copy of the float checkpoint `src` at `out` (minifastv/quant/), reading
    and writing one tensor at a time; every weight is checked for NaN and infinity on the way."""
    src, out = source_dir(Path(src), "checkpoint"), Path(out)
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
    with staged(out, overwrite) as tmp:
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
        if config.clip_text is not None:
            shutil.copyfile(src / CLIP_TOKENIZER, tmp / CLIP_TOKENIZER)
    log(f"wrote {out} ({quant.method}{'' if quant.group_size is None else f', groups of {quant.group_size}'})")
    return out
