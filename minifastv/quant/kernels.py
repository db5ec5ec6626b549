"""Which matmul the quantized linears run on this machine: measured at load, not assumed.

Each path (int8 weight-only, int8 with int8 activations, int4) has two regimes: decode (up to DECODE_ROWS rows:
32 for int8, 128 for int4) and prefill (more), and in each some candidate kernels (linear.CANDIDATES), the
default first. The fastest on one box is not the fastest on every box: with int8 activations, the integer GEMM
at one row was 1.2x faster than the weight-only kernel on an AMD EPYC with AVX-512 VNNI and 1.8x slower on an
Intel Xeon with AMX (docs/cpu.md). So `load` (and `set_activations`) time the candidates on the model's own
linears, in the model's float dtype and thread count:

- decode: one row through the linears of the first layers holding PROBE_BYTES of weights (all of them in a
  smaller model), so that each weight comes back cold, as it does in a decode step;
- prefill: PROBE_ROWS rows through one linear of each shape of the first layer (q, gate and down in LLaMA);

an untimed round of one row (it pages mapped weights in), then up to ROUNDS rounds alternating the candidates
(one, when the runner-up takes CLEAR times the best's time), medians. A candidate replaces the default only
when it is MARGIN times faster, so that noise does not flip the choice. The
choice is cached per machine (CPU model and vector ISA), torch version, threads, float dtype, path and shapes,
in `kernels.json` under $MINIFASTV_CACHE (default ~/.cache/minifastv), so a machine probes a model's shape once
and every later load runs the same kernels. A model whose fp32 decoder weights are under
machine.SMALL_DECODER_BYTES keeps the defaults: its weights sit in cache and its matmuls take microseconds,
which a probe would time as noise. Off the CPU every pass is blockwise.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import statistics
import time
from pathlib import Path

import torch

from ..machine import SMALL_DECODER_BYTES, cpu_name, decoder_fp32_bytes
from .int8act import ACTIVATIONS, int8_gemm_exact
from .linear import CANDIDATES, REGIMES, Int4Linear, Int8Linear, QuantLinear, default_kernels, quantized_modules

PROBE_ROWS = 256          # rows of the prefill probe: between the regimes' boundary and a prompt with an image
PROBE_BYTES = 256 << 20   # weights the decode probe runs through: more than any CPU's last-level cache
ROUNDS = 3
MARGIN = 1.1              # another kernel replaces the default only when the default takes this much longer
CLEAR = 2.0               # ...and when the runner-up takes this much longer than the best, one round decides
CACHE_FILE = "kernels.json"
LAYER = re.compile(r"llm\.layers\.(\d+)\.")


@dataclasses.dataclass
class KernelChoice:
    """What a model's quantized linears run: per regime, the kernel, and how it was chosen."""

    path: str                                   # "int8", "int8 + int8 activations" or "int4"
    kernels: dict[str, str]                     # regime -> kernel
    how: str                                    # "probed in 1.9 s", "cached ...", or why the defaults hold
    timings: dict[str, dict[str, float]] | None = None   # regime -> kernel -> ms per probe pass
    probe_s: float = 0.0                        # seconds this load spent probing

    def describe(self) -> str:
        line = f"kernels ({self.path}): " + ", ".join(f"{r} {self.kernels[r]}" for r in REGIMES) + f"; {self.how}"
        if self.timings:
            line += " (ms per probe pass: " + "; ".join(
                f"{r} " + ", ".join(f"{k} {ms:.1f}" for k, ms in self.timings[r].items()) for r in REGIMES) + ")"
        return line


def measure(regime: str, kernel: str, run) -> float:
    """Seconds that run() takes (the probe's clock; tests replace it to force a result)."""
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def quant_linears(model) -> list[tuple[str, QuantLinear]]:
    return [(name, m) for name, m in quantized_modules(model) if isinstance(m, QuantLinear)]


def use_kernels(model, kernels: dict[str, str]):
    """Make every quantized linear of `model` run `kernels` (regime -> kernel, each a candidate of its path) on
    its present path; the kernels of its other path (int8 with or without int8 activations) are kept."""
    for _, linear in quant_linears(model):
        for regime in REGIMES:
            if kernels[regime] not in CANDIDATES[linear.path()][regime]:
                raise ValueError(f"{kernels[regime]!r} is not a {regime} kernel of {linear.path()}; choose one of "
                                 f"{', '.join(CANDIDATES[linear.path()][regime])}")
        linear.chosen = {**linear.chosen, linear.path(): dict(kernels)}


def weight_bytes(linear: QuantLinear) -> int:
    tensors = list(linear.buffers()) + list(getattr(linear, "packed_for_cpu", None) or ())
    return sum(t.nbytes for t in tensors)


def by_layer(model) -> list[list[QuantLinear]]:
    """The quantized linears of each decoder layer, in order (lm_head apart: it is not timed)."""
    layers = {}
    for name, linear in quant_linears(model):
        if (match := LAYER.match(name)) is not None:
            layers.setdefault(int(match[1]), []).append(linear)
    return [layers[i] for i in sorted(layers)]


def run_all(linears: list[QuantLinear], kernel: str, inputs: dict[int, torch.Tensor]):
    for linear in linears:
        linear.run(kernel, inputs[linear.in_features])


@torch.inference_mode()
def probe(model, path: str) -> dict[str, dict[str, float]]:
    """regime -> candidate -> median ms of one probe pass, timed on the model's own linears."""
    layers, decode, held = by_layer(model), [], 0
    for layer in layers:
        decode += layer
        held += sum(weight_bytes(linear) for linear in layer)
        if held >= PROBE_BYTES:
            break
    shapes = {(m.out_features, m.in_features): m for m in layers[0]}   # q_proj stands for k, v and o; gate for up
    g, timings = torch.Generator().manual_seed(0), {}
    for regime, linears, rows in (("decode", decode, 1), ("prefill", list(shapes.values()), PROBE_ROWS)):
        inputs = {k: torch.randn(rows, k, generator=g).to(model.dtype) for k in {m.in_features for m in linears}}
        runs = {kernel: [] for kernel in CANDIDATES[path][regime]}
        for kernel in runs:   # one row each, untimed: pages mapped weights in and warms the kernels up
            run_all(linears, kernel, {k: x[:1] for k, x in inputs.items()})
        for _ in range(ROUNDS):
            for kernel, seconds in runs.items():
                seconds.append(measure(regime, kernel, functools.partial(run_all, linears, kernel, inputs)))
            medians = sorted(statistics.median(seconds) for seconds in runs.values())
            if medians[1] > CLEAR * medians[0]:
                break
        timings[regime] = {kernel: 1e3 * statistics.median(seconds) for kernel, seconds in runs.items()}
    return timings


def pick(path: str, timings: dict[str, dict[str, float]]) -> dict[str, str]:
    """Per regime the default, unless another candidate is MARGIN times faster."""
    chosen = {}
    for regime, default in default_kernels(path).items():
        best = min(timings[regime], key=timings[regime].get)
        chosen[regime] = best if timings[regime][default] > MARGIN * timings[regime][best] else default
    return chosen


def cache_dir() -> Path:
    if os.environ.get("MINIFASTV_CACHE"):
        return Path(os.environ["MINIFASTV_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minifastv"


def cache_key(model, path: str) -> str:
    """What the choice depends on: the machine, torch, threads, the float dtype, the path and the shapes."""
    quant = model.config.quant
    shapes = sorted({(m.out_features, m.in_features) for layer in by_layer(model) for m in layer})
    return " | ".join([cpu_name(), torch.backends.cpu.get_cpu_capability(), f"torch {torch.__version__}",
                       f"{torch.get_num_threads()} threads", str(model.dtype).removeprefix("torch."),
                       path + (f" g{quant.group_size}" if quant.method == "int4" else ""),
                       ",".join(f"{n}x{k}" for n, k in shapes)])


def read_cache(file: Path) -> dict:
    try:
        entries = json.loads(file.read_text())
    except (OSError, ValueError):   # none yet, unreadable or damaged: probe again and write it anew
        return {}
    return entries if isinstance(entries, dict) else {}


def write_cache(file: Path, key: str, entry: dict) -> str | None:
    """Add one entry, atomically; returns why it could not be written, or None."""
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        entries = read_cache(file)
        entries[key] = entry
        tmp = file.with_name(f".{file.name}.{os.getpid()}")
        tmp.write_text(json.dumps(entries, indent=1) + "\n")
        os.replace(tmp, file)
    except OSError as e:
        return f"{file}: {e.strerror or e}"
    return None


def cached_kernels(entry, path: str) -> dict[str, str] | None:
    """The kernels a cache entry names, if it is well formed and names candidates of `path`."""
    if not isinstance(entry, dict) or not all(entry.get(r) in CANDIDATES[path][r] for r in REGIMES):
        return None
    return {r: entry[r] for r in REGIMES}


def cached_timings(entry: dict) -> dict[str, dict[str, float]] | None:
    """The probe's timings a cache entry keeps, if they are well formed (they are only printed)."""
    timings = entry.get("timings")
    ok = isinstance(timings, dict) and all(
        isinstance(timings.get(r), dict) and all(isinstance(ms, (int, float)) for ms in timings[r].values())
        for r in REGIMES)
    return timings if ok else None


def choose_kernels(model) -> KernelChoice | None:
    """Pick and set the kernels of a quantized model's linears for this machine (cached, else probed);
    recorded as model.kernel_choice. None for a float model."""
    linears = [m for _, m in quant_linears(model)]
    model.kernel_choice = None
    if not linears:
        return None
    path = linears[0].path()
    if model.device.type != "cpu":
        choice = KernelChoice(path, dict.fromkeys(REGIMES, "blockwise"), f"every pass is blockwise on {model.device}")
    elif isinstance(linears[0], Int4Linear) and linears[0].packed_for_cpu is None:
        choice = KernelChoice(path, dict.fromkeys(REGIMES, "blockwise"),
                              "blockwise: the int4 weights are not in the layout of torch's CPU kernel")
    elif decoder_fp32_bytes(model.config.text) < SMALL_DECODER_BYTES:
        size = decoder_fp32_bytes(model.config.text) / 2**20
        choice = KernelChoice(path, default_kernels(path), f"the defaults: a small model ({size:.0f} MiB of fp32 "
                              "decoder weights) runs from cache, where a probe would time noise")
    else:
        file, key = cache_dir() / CACHE_FILE, cache_key(model, path)
        entry = read_cache(file).get(key)
        if (kernels := cached_kernels(entry, path)) is not None:
            choice = KernelChoice(path, kernels, f"cached for this machine in {file}", cached_timings(entry))
        else:
            start = time.perf_counter()
            timings = probe(model, path)
            seconds = time.perf_counter() - start
            kernels = pick(path, timings)
            unwritten = write_cache(file, key, {**kernels, "timings": timings})
            how = f"probed in {seconds:.1f} s" + (f", not cached ({unwritten})" if unwritten else f", cached in {file}")
            choice = KernelChoice(path, kernels, how, timings, seconds)
    use_kernels(model, choice.kernels)
    model.kernel_choice = choice
    return choice


def set_activations(model, activations: str):
    """"int8": an int8 model quantizes its linears' activations as well and multiplies in integers, prefill and
    decode steps alike, where that is faster on this machine (the kernels are chosen again for the new path);
    "float" (the default): weight-only."""
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {', '.join(ACTIVATIONS)}, got {activations!r}")
    if activations == "int8":
        quant = model.config.quant
        if quant is None or quant.method != "int8":
            raise ValueError("int8 activations need an int8-quantized checkpoint (quantize --method int8); this one "
                             f"is {'float' if quant is None else quant.method}")
        if model.device.type != "cpu":
            raise ValueError(f"int8 activations run on a CPU; the model is on {model.device}")
        if not int8_gemm_exact():
            raise ValueError("int8 activations are not available on this CPU: its integer GEMM (torch._int_mm) "
                             "saturates on full-range int8 weights (AVX2 without AVX-512 VNNI)")
    for module in model.modules():
        if isinstance(module, Int8Linear):
            module.activations = activations
    choose_kernels(model)
