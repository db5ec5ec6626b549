"""int4 weights in the layout of torch's CPU kernel, stored beside a checkpoint so that `load` maps them instead
of repacking.

An int4 checkpoint stores the portable form (quant.py); torch's CPU kernel wants another layout, which depends
on the CPU's vector width (quant.cpu_int4_block), so `load` repacks every weight: it reads 3.5 GB and rewrites
it, ~8-15 s for LLaVA-1.5-7B. `python -m minifastv pack-cpu CKPT` (write_cpu_layout) writes that layout once,
as CKPT/cpu-int4-b{block}.safetensors: for each int4 linear NAME, NAME.packed (uint8 [out, in/2]) and
NAME.table (bf16 [in/G, out, 2]: scale and offset). Its metadata names the block and the checkpoint's weight
files with their sizes and modification times. `load` maps it, and skips the stored int4 tensors, when it
exists for this CPU's block and those files have not changed since; otherwise it repacks as before (and says
why when the file is there but stale). The portable form stays the checkpoint: the packed file only speeds up
loading on machines with the same vector width.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..files import CheckpointError, check_stored, weight_files, write_safetensors
from .linear import Int4Linear, cpu_int4_block


def layout_file(path: Path, block: int) -> Path:
    return Path(path) / f"cpu-int4-b{block}.safetensors"


def fingerprint(path: Path) -> str:
    """The checkpoint's weight files with their sizes and modification times, as the packed file records them."""
    return json.dumps([[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in weight_files(Path(path))])


def packable(model, block: int) -> dict:
    """name -> int4 linear of `model` that the CPU kernel runs: whole blocks of output channels (quant.py)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Int4Linear) and m.out_features % block == 0}


def write_cpu_layout(path: str | Path, model) -> Path:
    """Write the packed layout of `model` (loaded from checkpoint `path` on this CPU) beside the checkpoint,
    atomically. Returns the file written."""
    path, block = Path(path), cpu_int4_block()
    if model.config.quant is None or model.config.quant.method != "int4":
        raise ValueError(f"{path}: not an int4 checkpoint; only int4 weights are repacked at load")
    linears = {} if block is None else packable(model, block)
    if not linears or any(m.packed_for_cpu is None for m in linears.values()):
        raise ValueError(f"{path}: this CPU's int4 kernel layout is not known to minifastv, or no linear of this "
                         "model fits it, or the model is not on a CPU: its int4 weights run the blockwise path here "
                         "and need no packed file")
    tensors = {}
    for name, m in linears.items():
        tensors[f"{name}.packed"], tensors[f"{name}.table"] = m.packed_for_cpu
    file = layout_file(path, block)
    tmp = file.with_name(f".{file.name}.partial")
    try:
        write_safetensors(tensors, tmp, metadata={"block": str(block), "checkpoint": fingerprint(path)})
        os.replace(tmp, file)
    finally:
        tmp.unlink(missing_ok=True)
    return file


def read_cpu_layout(path: Path, model) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
    """name -> (packed weight, table), mapped, for the int4 linears of `model` (on the meta device) that the CPU
    kernel runs, from the checkpoint at `path`; None where there is no fresh packed file for this CPU. A file
    whose tensors do not fit the model is an error."""
    quant = model.config.quant
    block = None if quant is None or quant.method != "int4" else cpu_int4_block()
    file = None if block is None else layout_file(path, block)
    if file is None or not file.is_file():
        return None
    expected, linears = {}, packable(model, block)
    for name, m in linears.items():
        groups = m.in_features // m.quant.group_size
        expected[f"{name}.packed"] = torch.empty(m.out_features, m.in_features // 2, dtype=torch.uint8, device="meta")
        expected[f"{name}.table"] = torch.empty(groups, m.out_features, 2, dtype=torch.bfloat16, device="meta")
    try:
        with safe_open(str(file), "pt") as mapped:
            metadata = mapped.metadata() or {}
            if metadata.get("block") != str(block) or metadata.get("checkpoint") != fingerprint(path):
                warnings.warn(f"{file}: written for other weight files than {path}'s (they changed since); "
                              f"repacking at load instead (python -m minifastv pack-cpu {path} writes it again)",
                              stacklevel=3)
                return None
            if set(mapped.keys()) != set(expected):
                extra = sorted(set(mapped.keys()) - set(expected)) or sorted(set(expected) - set(mapped.keys()))
                raise CheckpointError(f"{file}: its tensors do not match the model: {extra[:3]}")
            tensors = {name: mapped.get_tensor(name) for name in expected}
    except SafetensorError as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
    for name, tensor in tensors.items():
        check_stored(name, tensor.shape, tensor.dtype, expected[name], True, file)
    return {name: (tensors[f"{name}.packed"], tensors[f"{name}.table"]) for name in linears}


def use_cpu_layout(model, packed: dict[str, tuple[torch.Tensor, torch.Tensor]]):
    """Give each int4 linear named in `packed` its packed weight and table in place of its stored tensors."""
    for name, pair in packed.items():
        m = model.get_submodule(name)
        del m.weight, m.scale, m.zero
        m.packed_for_cpu = pair
