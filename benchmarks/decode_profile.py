"""Where one decode step of LLaVA-1.5-7B's decoder goes, at full depth, on a CPU: the linears, attention over the
cache, norms, rotary, the cache write, the mask, sampling, casts and the rest (Python and dispatch), against
the bandwidth limit measured on the same box (a streaming read of as many bytes as the decoder's weights).

The decoder gets random weights of the 7B shape (int8, int4 or float), built in memory (no checkpoint), and a
KV cache filled with random keys and values for a --context-token prompt; then --steps greedy decode steps are
timed without a profiler (the step time) and once more under torch.profiler, each part of the step marked
by a record_function range (their inclusive times; the rest is the step minus the parts).

    python benchmarks/decode_profile.py [--quant int8 int8-act int4] [--layers 32] [--context 632] [--steps 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import minifastv.models.llama as llama  # noqa: E402
from minifastv.bench.machine import describe  # noqa: E402
from minifastv.checkpoint import empty_model  # noqa: E402
from minifastv.config import LlavaConfig, QuantConfig  # noqa: E402
from minifastv.machine import auto_dtype  # noqa: E402
from minifastv.models.cache import KVCache, LayerCache  # noqa: E402
from minifastv.quant import set_activations  # noqa: E402
from minifastv.quant.linear import QuantLinear, pack_for_device  # noqa: E402

generate_module = importlib.import_module("minifastv.models.generate")  # the module (the package's `generate` is a function)

PARTS = ("linears", "attention", "norms", "rotary", "cache write", "mask", "sampling", "embedding")


def random_decoder(quant: QuantConfig | None, layers: int, dtype: torch.dtype):
    """The 7B-shaped model with random weights: quantized linears get random codes and plausible scales."""
    base = LlavaConfig.from_name("llava-1.5-7b")
    config = dataclasses.replace(base, text=dataclasses.replace(base.text, n_layers=layers), quant=quant)
    model = empty_model(config)
    g = torch.Generator().manual_seed(0)
    state = {}
    for name, meta in model.state_dict().items():
        if meta.dtype == torch.int8:
            state[name] = torch.randint(-127, 128, meta.shape, dtype=torch.int8, generator=g)
        elif meta.dtype == torch.uint8:
            state[name] = torch.randint(0, 256 if name.endswith("weight") else 16, meta.shape, dtype=torch.uint8,
                                        generator=g)
        elif name.endswith("scale"):
            state[name] = torch.full(meta.shape, 0.02 / 64, dtype=meta.dtype)
        elif "norm" in name:
            state[name] = torch.ones(meta.shape, dtype=dtype)
        else:
            state[name] = torch.randn(meta.shape, generator=g, dtype=torch.float32).mul_(0.02).to(dtype)
    model.load_state_dict(state, assign=True)
    pack_for_device(model)
    return model.eval()


def weight_bytes(model) -> int:
    """Bytes a decode step reads: the decoder's layers and lm_head (one embedding row is nothing)."""
    return sum(t.numel() * t.element_size() for name, t in model.state_dict().items()
               if name.startswith("llm.layers.") or name.startswith("llm.lm_head") or name.startswith("llm.norm"))


def streaming_read_gbs(n_bytes: int, repeats: int = 3) -> float:
    """GB/s of a float32 sum over n_bytes (vectorised and memory-bound; an int32 sum is not vectorised)."""
    data = torch.ones(n_bytes // 4, dtype=torch.float32)
    data.sum()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        times.append(time.perf_counter() - start)
    return n_bytes / min(times) / 1e9


def fill_cache(model, context: int, kind=KVCache) -> KVCache:
    """A cache of `kind` holding seeded random keys and values for a `context`-token prompt (the same every call)."""
    text = model.config.text
    cache = kind(text.n_layers, extra=64)
    g = torch.Generator().manual_seed(1)
    for layer in cache.layers:
        k, v = (torch.randn(1, text.n_kv_heads, context, text.head_dim, generator=g) for _ in range(2))
        layer.update(k, v, torch.ones(1, context, dtype=torch.bool))
    return cache


def mark(label):
    """A function wrapper that puts every call inside record_function(label)."""
    def wrap(f):
        @functools.wraps(f)
        def marked(*args, **kwargs):
            with record_function(label):
                return f(*args, **kwargs)
        return marked
    return wrap


def install_marks(model):
    """record_function ranges around each part of a step (hooks on modules, wrappers on functions)."""
    def hooks(module, label):
        module.register_forward_pre_hook(lambda m, a: setattr(m, "_range", record_function(label).__enter__()))
        module.register_forward_hook(lambda m, a, o: m._range.__exit__(None, None, None))

    for module in model.modules():
        if isinstance(module, (QuantLinear, torch.nn.Linear)):
            hooks(module, "linears")
        elif isinstance(module, llama.RMSNorm):
            hooks(module, "norms")
        elif isinstance(module, torch.nn.Embedding):
            hooks(module, "embedding")
    llama.apply_rope, llama.Rotary.__call__ = mark("rotary")(llama.apply_rope), mark("rotary")(llama.Rotary.__call__)
    llama.attention_mask = mark("mask")(llama.attention_mask)
    LayerCache.update = mark("cache write")(LayerCache.update)
    generate_module.sample = mark("sampling")(generate_module.sample)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    llama.F = type("F", (), {name: staticmethod(getattr(torch.nn.functional, name))
                             for name in dir(torch.nn.functional) if not name.startswith("__")})
    llama.F.scaled_dot_product_attention = staticmethod(mark("attention")(sdpa))


def steps(model, cache, position, n):
    tokens = torch.tensor([1])
    for _ in range(n):
        logits = model.decode_step(tokens, position, cache)
        tokens = generate_module.sample(logits)
        position = position + 1
    return position


@torch.inference_mode()
def profile_one(name, quant, args, dtype):
    model = random_decoder(quant, args.layers, dtype)
    if name == "int8-act":
        set_activations(model, "int8")
    n_bytes = weight_bytes(model)
    cache = fill_cache(model, args.context)
    position = torch.tensor([args.context])
    position = steps(model, cache, position, 2)                                   # warm-up
    walls = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        position = steps(model, cache, position, args.steps)
        walls.append((time.perf_counter() - start) / args.steps)
    wall = statistics.median(walls)
    install_marks(model)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        steps(model, cache, position, args.steps)
        profiled = (time.perf_counter() - start) / args.steps
    parts = {event.key: event.cpu_time_total / 1e6 / args.steps for event in prof.key_averages() if event.key in PARTS}
    if missing := [part for part in PARTS if part not in parts]:   # a mark on code that moved or is no longer called
        raise SystemExit(f"decode_profile: no {', '.join(missing)} in the profile: install_marks wraps code a decode "
                         "step does not run")
    parts = {part: parts[part] for part in PARTS}
    gbs = streaming_read_gbs(min(n_bytes, 4 << 30))
    limit = n_bytes / (gbs * 1e9)
    print(f"\n{name}: {n_bytes / 2**30:.2f} GiB of decoder weights read per step; streaming read {gbs:.1f} GB/s "
          f"-> a step can take no less than {limit * 1e3:.0f} ms ({1 / limit:.1f} tok/s)")
    print(f"decode step {wall * 1e3:.0f} ms ({1 / wall:.2f} tok/s; runs {', '.join(f'{w * 1e3:.0f}' for w in walls)}"
          f" ms), {limit / wall:.0%} of the bandwidth limit; under the profiler {profiled * 1e3:.0f} ms")
    print("| part | ms per step | share |\n|---|---|---|")
    for part, seconds in parts.items():
        print(f"| {part} | {seconds * 1e3:.1f} | {seconds / profiled:.0%} |")
    rest = profiled - sum(parts.values())
    print(f"| the rest (residual adds, SwiGLU, casts, Python and dispatch) | {rest * 1e3:.1f} | {rest / profiled:.0%} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quant", nargs="+", choices=["int8", "int8-act", "int4", "none"], default=["int8", "int4"],
                   help="int8-act: int8 weights with int8 activations (--activations int8)")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--context", type=int, default=632, help="tokens in the cache (LLaVA's prompt with one image)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = auto_dtype(torch.device("cpu"))[0] if args.dtype == "auto" else getattr(torch, args.dtype)
    print(describe())
    print(f"LLaVA-1.5-7B decoder shape, {args.layers} layers, {args.context} tokens in the cache, float parts "
          f"{str(dtype).removeprefix('torch.')}; median of {args.repeats} runs of {args.steps} steps")
    quants = {"int8": QuantConfig("int8"), "int8-act": QuantConfig("int8"), "int4": QuantConfig("int4", 128),
              "none": None}
    for name in args.quant:
        profile_one(name, quants[name], args, dtype)


if __name__ == "__main__":
    main()
