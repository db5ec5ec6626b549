"""Speed of minifastv and FastV on this machine. Prints tables; never part of the tests.

    python -m minifastv bench [--model tiny]
    python -m minifastv bench --model 7b --layers 32 [--no-hf]

1. FastV: prefill time at K=2 for R in {0, 0.25, 0.5, 0.75} next to the theoretical FLOPs ratio; decode
   tokens/s and KV-cache bytes with and without pruning.
2. minifastv against transformers' LlavaForConditionalGeneration holding the SAME weight tensors (shared,
   not copied), same dtype and thread count: prefill latency and decode tokens/s. transformers is the
   tests' reference, not a dependency: without it (pip install "minifastv[test]") this part is left out.
3. Achieved prefill TFLOP/s against a measured bf16 (or fp32) matmul peak.
4. Every pruning method keeping 25% of the image tokens: prefill time, speedup, and its selection's time.

Timings are medians over --repeats runs after a warm-up, in one process with a fixed thread count.
The 7b model is LLaVA-1.5-7B-shaped with random bf16 weights and a 576-token image in a realistic prompt
(35 system tokens, the image, 20 question tokens); --layers scales the decoder depth.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import statistics
import sys
import time

import torch

from ..checkpoint import load
from ..config import LlavaConfig
from ..data import TINY_MODEL
from ..machine import auto_dtype
from ..models import LlavaModel
from ..pruning import METHODS, at_budget, make
from .machine import describe, spread_warning
from .timing import minifastv_generate, rate, repeat, spread_ms, timed


def matmul_peak(dtype, repeats: int, n: int = 2048) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / repeat(lambda: a @ b, repeats).median / 1e12


def random_model(config: LlavaConfig, dtype) -> LlavaModel:
    """A model with random weights, allocated directly in `dtype` (no fp32 copy on the way)."""
    with torch.device("meta"):
        model = LlavaModel(config)
    model = model.to_empty(device="cpu").to(dtype)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(0.02).to(dtype))
    return model.eval()


def prompt(config: LlavaConfig, n_system: int = 35, n_question: int = 20):
    """BOS + system tokens, the image placeholder, question tokens: LLaVA-1.5's layout."""
    g = torch.Generator().manual_seed(1)
    text = torch.randint(4, min(config.text.vocab_size, 30000) - 1, (n_system + n_question,), generator=g)
    text = (text + (text >= config.image_token_id).long()).tolist()  # never the image placeholder
    ids = [config.text.bos_token_id] + text[:n_system] + [config.image_token_id] + text[n_system:]
    pixels = torch.randn(1, 3, config.vision.image_size, config.vision.image_size, generator=g)
    return torch.tensor([ids]), pixels


def model_flops(config: LlavaConfig, layer_tokens: list[int]) -> float:
    """Matmul FLOPs of one prefill whose decoder layers ran on layer_tokens (Prefill.layer_tokens): vision
    tower + projector + decoder (attention counted in full, GQA-exact) + lm_head on the last token."""
    v, t = config.vision, config.text
    N = v.n_patches + 1
    vision = v.n_used_layers * (2 * N * 4 * v.dim**2 + 4 * N * N * v.dim + 4 * N * v.dim * v.intermediate_size)
    vision += 2 * N * 3 * v.patch_size**2 * v.dim + 2 * v.n_patches * (v.dim * t.dim + t.dim * t.dim)
    kv = t.n_kv_heads * t.head_dim

    def layer(m):
        return 2 * m * t.dim * (2 * t.dim + 2 * kv) + 4 * m * m * t.dim + 6 * m * t.dim * t.intermediate_size

    return vision + sum(layer(m) for m in layer_tokens) + 2 * t.dim * t.vocab_size


def bench_fastv(model, ids, pixels, repeats: int, decode_tokens: int, method=make, name: str = "fastv",
                k: int | None = None):
    """Prefill and decode speed of pruning method `name` at R in 0 / 0.25 / 0.5 / 0.75 (make(name, R, k))."""
    cfg = model.config
    rows, prunes = [], {}
    for ratio in (0.0, 0.25, 0.5, 0.75):
        prune = prunes[ratio] = None if ratio == 0 else method(name, ratio, k)
        timing = timed(minifastv_generate(model, ids, pixels, decode_tokens, prune), repeats)
        t_prefill, decode = timing.prefill_s, timing.decode_tok_s
        with torch.inference_mode():
            cache = model.cache_type(cfg.text.n_layers, decode_tokens)
            pre = model.prefill(ids, pixels, prune=prune, cache=cache, last_only=True)
        rows.append(dict(ratio=ratio, kept=len(pre.kept_image_slots()[0]), theory=pre.flops[0] / pre.flops_unpruned[0],
                         prefill=t_prefill, prefills=timing.prefills, decode=decode, cache=cache.nbytes(),
                         flops=model_flops(cfg, pre.layer_tokens[0].tolist())))
    base, n, n_image = rows[0], pre.n_prompt_tokens()[0], pre.n_image_tokens()[0]
    label = repr(prunes[0.5]).replace("ratio=0.5", "ratio=R")  # the settings that ran
    new = f"{timing.tokens} new token{'' if timing.tokens == 1 else 's'}"
    print(f"\n{label}, prompt of {n} tokens ({n_image} image tokens), {new}, median of {timing.runs}")
    print("theoretical: the paper's decoder-only formula; model FLOPs: every matmul, vision tower included")
    print("| R | image tokens kept | theoretical FLOPs | model FLOPs | prefill ms (spread) | measured speedup | "
          "theoretical speedup | measured/theoretical | measured/model-FLOPs speedup | decode tok/s | "
          "KV cache (allocated) MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        speedup, ideal, model_ideal = base["prefill"] / r["prefill"], 1 / r["theory"], base["flops"] / r["flops"]
        print(f"| {r['ratio']} | {r['kept']} | {r['theory']:.1%} | {r['flops'] / base['flops']:.1%} | "
              f"{r['prefill'] * 1e3:.1f} ({spread_ms(r['prefills'])}) | {speedup:.2f}x | {ideal:.2f}x | "
              f"{speedup / ideal:.2f} | {speedup / model_ideal:.2f} | {rate(r['decode'])} | {r['cache'] / 2**20:.1f} |")
    for r in rows:
        warning = spread_warning(f"the prefill at R={r['ratio']}", list(r["prefills"]))
        if warning:
            print(warning)
    return rows


def bench_methods(model, ids, pixels, repeats: int, kept: float = 0.25):
    """Every pruning method leaving `kept` of the image tokens (K=2 where it has a layer): median prefill time,
    the speedup over no pruning, and the time its selection takes, from the model's report."""
    def prefill(method):
        with torch.inference_mode():
            return model.prefill(ids, pixels, prune=method, last_only=True)

    def run(method):
        prefill(method)  # warm-up
        reports, times = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            reports.append(prefill(method))
            times.append(time.perf_counter() - start)
        warnings.append(spread_warning(f"the prefill with {method!r}", times))
        return statistics.median(times), statistics.median(r.select_s for r in reports), reports[0], len(times)

    warnings = []
    base, _, _, runs = run(None)
    print(f"\nevery pruning method keeping {kept:.0%} of the image tokens (K=2 where a method has a layer); "
          f"prefill = vision tower + decoder, median of {runs}")
    print("| method | image tokens kept (last stage) | theoretical FLOPs | prefill ms | speedup | selection ms | "
          "selection / prefill |\n|---|---|---|---|---|---|---|")
    print(f"| none | {model.config.vision.n_patches} | 100.0% | {base * 1e3:.1f} | 1.00x | - | - |")
    for name in METHODS:
        try:
            seconds, select, pre, _ = run(at_budget(name, kept))
        except ValueError as e:   # a method this model cannot run (cdpruner without CLIP's text tower)
            print(f"| {name} | not run: {str(e).split(':')[0]} | | | | | |")
            continue
        print(f"| {name} | {len(pre.kept_image_slots()[0])} | {pre.flops[0] / pre.flops_unpruned[0]:.1%} | "
              f"{seconds * 1e3:.1f} | {base / seconds:.2f}x | {select * 1e3:.2f} | {select / seconds:.1%} |")
    for warning in filter(None, warnings):
        print(warning)


def profile_prefill(model, ids, pixels, rows: int = 12):
    """Where one prefill (no FastV) spends its time, by operator: torch.profiler's table."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        model.prefill(ids, pixels, last_only=True)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model.prefill(ids, pixels, last_only=True)
    print("\nprefill profile (no FastV), by operator:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="python -m minifastv bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="With --quant int8|int4: the full-depth LLaVA-1.5-7B run on a CPU "
                                       "(minifastv/bench/cpu7b.py; --quant int8 --help for its options).")
    p.add_argument("--model", default="tiny", help="'tiny' (the shipped tiny model), '7b' (random, "
                                                   "LLaVA-1.5-7B-shaped), or a checkpoint directory")
    p.add_argument("--layers", type=int, default=None, help="decoder layers of the 7b model (default 32)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default=None,
                   help="default: bfloat16 for 7b, the checkpoint's dtype otherwise; auto: as minifastv.load picks "
                        "for this machine and model; on CPUs without native bf16 (no AVX512-BF16/AMX) bf16 "
                        "matmuls are emulated and very slow: use float32 or auto")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    p.add_argument("--profile", action="store_true", help="also print an operator profile of one prefill")
    p.add_argument("--prune", choices=list(METHODS), default="fastv", help="pruning method of the first table "
                                                                           "(default: %(default)s)")
    p.add_argument("--prune-k", type=int, default=None, help="its layer, where it has one (default: its own, 2)")
    args = p.parse_args(argv)
    for flag, value in (("--repeats", args.repeats), ("--decode-tokens", args.decode_tokens),
                        ("--threads", args.threads), ("--layers", args.layers)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    if args.layers is not None and args.model != "7b":
        raise ValueError("--layers sets the depth of --model 7b; a checkpoint has its own")
    torch.set_num_threads(args.threads)
    if args.model == "7b":
        base = LlavaConfig.from_name("llava-1.5-7b")
        config = dataclasses.replace(base, text=dataclasses.replace(base.text, n_layers=args.layers or 32))
        dtype = auto_dtype(torch.device("cpu"), config)[0] if args.dtype == "auto" else \
            getattr(torch, args.dtype or "bfloat16")
        model = random_model(config, dtype)
    else:
        model = load(TINY_MODEL if args.model == "tiny" else args.model, dtype=args.dtype)
    ids, pixels = prompt(model.config)
    print(f"{describe(torch.get_num_threads())}; model: {args.model} ({model.config.text.n_layers} decoder layers, "
          f"{str(model.dtype).removeprefix('torch.')}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:,.1f}M params)")
    rows = bench_fastv(model, ids, pixels, args.repeats, args.decode_tokens, name=args.prune, k=args.prune_k)
    peak = matmul_peak(model.dtype, args.repeats)
    achieved = rows[0]["flops"] / rows[0]["prefill"] / 1e12
    print(f"\nprefill (no FastV): {achieved:.3f} TFLOP/s achieved; {str(model.dtype).removeprefix('torch.')} "
          f"matmul peak (2048^3) {peak:.3f} TFLOP/s; {achieved / peak:.0%} of peak")
    bench_methods(model, ids, pixels, args.repeats)
    if args.profile:
        profile_prefill(model, ids, pixels)
    if not args.no_hf and importlib.util.find_spec("transformers") is None:
        print('\nminifastv vs transformers: left out, transformers is not installed (pip install "minifastv[test]")')
    elif not args.no_hf:
        from .versus import bench_transformers

        bench_transformers(model, ids, pixels, args.repeats, args.decode_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
