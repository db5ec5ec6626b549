"""`python -m minifastv ...`: answer questions about images with a checkpoint, with or without FastV."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from .config import INT4_GROUP_SIZES, QUANT_METHODS
from .machine import DTYPES, physical_cores

from .data import SAMPLES, TINY_MODEL
DEFAULT_GROUP_SIZE = 128


def pruner_from_args(args, default=None):
    """The pruning method the command line asks for: --prune NAME with --prune-ratio/--prune-k/--prune-seed,
    or FastV's own spelling --fastv-k K [--fastv-ratio R]; `default` when neither is given (and the method
    that --prune-* settings alone apply to)."""
    from .pruning import METHODS, FastV, make

    prune_opts = [f"--prune-{n}" for n in ("ratio", "k", "seed") if getattr(args, f"prune_{n}") is not None]
    fastv_opts = [f"--fastv-{n}" for n in ("k", "ratio") if getattr(args, f"fastv_{n}") is not None]
    if fastv_opts and (args.prune is not None or prune_opts):
        raise ValueError(f"{' and '.join(fastv_opts)} spell FastV's settings; with --prune use --prune-ratio "
                         "and --prune-k")
    name = args.prune
    if name is None and prune_opts:
        if default is None:
            raise ValueError(f"{', '.join(prune_opts)} given without --prune NAME (the pruning method)")
        name = next(key for key, cls in METHODS.items() if type(default) is cls)
    if name is not None:
        return make(name, 0.5 if args.prune_ratio is None else args.prune_ratio, args.prune_k, args.prune_seed)
    if args.fastv_k is None and args.fastv_ratio is not None and default is None:
        raise ValueError("--fastv-ratio needs --fastv-k (the layer FastV prunes after; the paper's is 2)")
    if fastv_opts:
        k, ratio = 2 if args.fastv_k is None else args.fastv_k, 0.5 if args.fastv_ratio is None else args.fastv_ratio
        return FastV(k, ratio)
    return default


def describe(method) -> str:
    """'FastV K=2 R=0.5': the method and its settings."""
    from dataclasses import fields

    names = {"k": "K", "ratio": "R"}
    return type(method).__name__ + "".join(f" {names.get(f.name, f.name)}={getattr(method, f.name)}"
                                            for f in fields(method))


def load_pipeline(args):
    """Threads, device and dtype from the command line, then the checkpoint; says what it chose on stderr."""
    from .machine import peak_rss_bytes, resolve_device, resolve_dtype, set_threads
    from .pipeline import Pipeline

    threads = set_threads(args.threads)
    device = resolve_device(args.device)
    dtype, why = resolve_dtype(args.dtype, device)
    start = time.perf_counter()
    pipe = Pipeline.load(args.model, dtype=dtype, device=device, check=args.check_weights)
    model = pipe.model
    seconds, rss = time.perf_counter() - start, peak_rss_bytes()
    quant = model.config.quant
    print(f"{args.model}: {'float' if quant is None else quant.method} decoder linears, "
          f"{str(model.dtype).removeprefix('torch.')} float weights ({why}), {device}"
          + (f", {threads} threads" if device.type == "cpu" else "")
          + f"; loaded in {seconds:.2f} s" + ("" if rss is None else f", peak RSS {rss / 2**30:.2f} GiB"),
          file=sys.stderr)
    return pipe


def cmd_generate(args):
    method = pruner_from_args(args)
    pipe = load_pipeline(args)
    generator = None if args.seed is None else torch.Generator(pipe.model.device).manual_seed(args.seed)
    stream_text = None if args.json else (lambda t: print(t, end="", flush=True))
    r = pipe.answer(args.image, args.prompt, prune=method, max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature, top_p=args.top_p, generator=generator, on_text=stream_text)
    if args.json:
        print(json.dumps({"text": r.text, "token_ids": r.token_ids, "n_prompt_tokens": r.n_prompt_tokens,
                          "n_image_tokens": r.n_image_tokens, "kept_image_tokens": r.kept,
                          "kept_image_slots": r.kept_image_slots, "flops": r.flops, "flops_unpruned": r.flops_unpruned,
                          "prefill_s": r.prefill_s, "decode_s": r.decode_s, "decode_steps": r.decode_steps}))
        return
    print()
    print(r.summary())


def cmd_demo(args):
    """Each sample image's question answered by the model, unpruned and pruned (FastV K=2, R=0.5 unless asked)."""
    from .pruning import FastV

    method = pruner_from_args(args, default=FastV(2, 0.5))
    pipe = load_pipeline(args)
    samples = json.loads((SAMPLES / "questions.json").read_text())
    for s in samples:
        print(f"\n{s['image']}: {s['question']}  (expected: {s['answer']})")
        for name, m in (("unpruned", None), (describe(method), method)):
            r = pipe.answer([SAMPLES / s["image"]], s["question"], prune=m, max_new_tokens=4)
            print(f"  {name:<18} -> {r.text:<10} {r.summary()}")


def cmd_analyze(args):
    """Attention shares per layer (table + PNG), the patches a pruning method keeps (PNG and a `kept patches:`
    line, row-major indices in the first image's grid), and the patches every method keeps, side by side."""
    from .analyze import SEGMENTS, attention_shares, kept_patches, kept_patches_picture, side_by_side
    from .pruning import METHODS, FastV, at_budget
    from .image import load_image, model_view
    from .plot import line_plot

    out = Path(args.out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: --out-dir is a file, not a directory")
    method = pruner_from_args(args, default=FastV(2, 0.5))
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(args)
    model, cfg = pipe.model, pipe.model.config
    if len(args.image) > 1:
        raise ValueError(f"analyze looks at one image, got {len(args.image)} --image options")
    image = load_image(args.image[0])
    batch = pipe.inputs([image], args.prompt)
    ids, pixels = batch.input_ids, batch.pixel_values
    shares = attention_shares(model, ids, pixels)
    print("share of attention, head-averaged: last prompt token | mean over instruction tokens")
    print("| layer | " + " | ".join(f"last->{s}" for s in SEGMENTS) + " | " +
          " | ".join(f"instr->{s}" for s in SEGMENTS) + " |\n|---|" + "---|" * 6)
    for i, row in enumerate(shares):
        print(f"| {i} | " + " | ".join(f"{v:.1%}" for v in row["last"] + row["instruction"]) + " |")
    series = {f"{who} -> {seg}": [(i, row[key][j]) for i, row in enumerate(shares)]
              for who, key in (("last", "last"), ("instr", "instruction")) for j, seg in enumerate(SEGMENTS)}
    line_plot(series, out / "attention_shares.png", xlabel="layer", ylabel="share of attention",
              ylim=(0.0, 1.0), percent_y=True)
    view = model_view(image, cfg.vision.image_size, cfg.image_mode, cfg.image_mean)
    grid = cfg.vision.image_size // cfg.vision.patch_size
    scale = max(1, 384 // cfg.vision.image_size)
    kept = kept_patches(model, ids, pixels, method)
    kept_patches_picture(view, grid, kept, scale=scale).save(out / "kept_patches.png")
    print(f"\n{describe(method)} keeps {len(kept)} of {grid * grid} patches")
    print("kept patches: " + ", ".join(map(str, kept)))
    share = len(kept) / (grid * grid)  # every method at the same budget, K=2 where it has a layer
    every = [(f"{name} ({len(k)})", kept_patches_picture(view, grid, k, scale=scale))
             for name, k in ((name, kept_patches(model, ids, pixels, at_budget(name, share))) for name in METHODS)]
    side_by_side(every).save(out / "kept_patches_methods.png")
    print(f"wrote {out / 'attention_shares.png'}, {out / 'kept_patches.png'} and {out / 'kept_patches_methods.png'} "
          f"(every method keeping {share:.1%} of the patches)")


def add_convert_arguments(p):
    p.add_argument("src", help="source checkpoint directory (config.json + weights)")
    p.add_argument("out", help="output directory (must not exist unless --force)")
    p.add_argument("--vision-tower", help="CLIP checkpoint directory, for original LLaVA checkpoints without one")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="output dtype (default: the source config's dtype, else float32)")
    p.add_argument("--tokenizer", help="tokenizer.json to ship (default: SRC/tokenizer.json)")
    p.add_argument("--quantize", choices=QUANT_METHODS, help="weight-only quantization of the decoder's linears "
                   "(int8: a scale per output channel; int4: a scale and zero point per group of inputs)")
    add_output_arguments(p)


def add_output_arguments(p):
    p.add_argument("--group-size", type=int, default=None,
                   help=f"int4: inputs per scale and zero point, one of {', '.join(map(str, INT4_GROUP_SIZES))} "
                        f"(default {DEFAULT_GROUP_SIZE})")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--max-shard-gb", type=float, default=2.0, help="output shard size in GB (default: %(default)s)")


def quant_from_args(method, group_size):
    from .config import ConfigError, QuantConfig

    if group_size is not None and method != "int4":
        raise ValueError("--group-size applies to int4 quantization only")
    if method is None:
        return None
    if method == "int4" and group_size is None:
        group_size = DEFAULT_GROUP_SIZE
    try:
        return QuantConfig(method, group_size)
    except ConfigError as e:
        raise ValueError(str(e)) from None


def cmd_convert(args):
    from .convert import convert

    convert(args.src, args.out, vision_tower=args.vision_tower, dtype=args.dtype, tokenizer=args.tokenizer,
            force=args.force, quant=quant_from_args(args.quantize, args.group_size),
            max_shard_bytes=int(args.max_shard_gb * 2**30))


def cmd_quantize(args):
    from .checkpoint import quantize_checkpoint

    quantize_checkpoint(args.src, args.out, quant_from_args(args.method, args.group_size), overwrite=args.force,
                        max_shard_bytes=int(args.max_shard_gb * 2**30))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # its own options, --help included, belong to the benchmark
        from .bench import main as bench

        try:
            return bench(argv[1:])
        except (ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    parser = argparse.ArgumentParser(prog="python -m minifastv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, default_method="none"):
        from .pruning import METHODS

        p.add_argument("--model", default=str(TINY_MODEL), help="minifastv checkpoint directory (default: the "
                                                           "shipped tiny model)")
        p.add_argument("--prune", choices=list(METHODS),
                       help=f"visual-token pruning method (default: {default_method})")
        p.add_argument("--prune-ratio", type=float, help="fraction of image tokens dropped (default 0.5)")
        p.add_argument("--prune-k", type=int, help="the layer the method prunes after, where it has one "
                                                   "(default: the method's, 2)")
        p.add_argument("--prune-seed", type=int, help="seed, for methods that draw at random (default 0)")
        p.add_argument("--fastv-k", type=int, help="FastV's spelling: --prune fastv --prune-k K")
        p.add_argument("--fastv-ratio", type=float, help="FastV's spelling: --prune-ratio R (with --fastv-k)")
        p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                       help="float weights' dtype; auto: bf16 where the CPU (or GPU) computes it natively, "
                            "else fp32 (default: %(default)s)")
        p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default: %(default)s)")
        p.add_argument("--threads", type=int, default=None,
                       help=f"CPU threads (default: the physical cores, {physical_cores()} here)")
        p.add_argument("--check-weights", action="store_true",
                       help="scan every weight for NaN/inf while loading (conversion already does)")

    g = sub.add_parser("generate", help="answer a question about one or more images")
    common(g)
    g.add_argument("--image", action="append", required=True, help="image file (repeat for several)")
    g.add_argument("--prompt", required=True, help="the question")
    g.add_argument("--max-new-tokens", type=int, default=64, help="(default: %(default)s)")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="0: greedy; above 0 the logits are divided by it before sampling (default: %(default)s)")
    g.add_argument("--top-p", type=float, default=1.0,
                   help="sample from the smallest set of tokens holding this much probability (default: %(default)s)")
    g.add_argument("--seed", type=int, default=None, help="seed for sampling: the same seed, the same answer")
    g.add_argument("--json", action="store_true",
                   help="print one JSON object (text, token ids, kept image tokens, FLOPs, timings) instead")
    g.set_defaults(run=cmd_generate)

    d = sub.add_parser("demo", help="the shipped tiny model on the sample images, with and without FastV")
    common(d, default_method="fastv K=2 R=0.5")
    d.set_defaults(run=cmd_demo)

    a = sub.add_parser("analyze", help="attention shares per layer and the patches FastV keeps, as tables and PNGs")
    common(a, default_method="fastv K=2 R=0.5")
    a.add_argument("--image", required=True, action="append", help="image file (one)")
    a.add_argument("--prompt", required=True, help="the question")
    a.add_argument("--out-dir", default="analysis", help="where the PNG files go (default: %(default)s)")
    a.set_defaults(run=cmd_analyze)

    c = sub.add_parser("convert", help="convert a LLaVA-1.5 checkpoint (same as convert_weights.py)")
    add_convert_arguments(c)
    c.set_defaults(run=cmd_convert)

    q = sub.add_parser("quantize", help="weight-only int8/int4 copy of a minifastv checkpoint")
    q.add_argument("src", help="float minifastv checkpoint directory")
    q.add_argument("out", help="output directory (must not exist unless --force)")
    q.add_argument("--method", choices=QUANT_METHODS, required=True,
                   help="int8: a scale per output channel; int4: a scale and zero point per group of inputs")
    add_output_arguments(q)
    q.set_defaults(run=cmd_quantize)

    sub.add_parser("bench", help="FastV and minifastv speed; --quant int8 int4: 7B on a CPU (--help for options)")

    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, OSError) as e:  # our errors name the file, key or value at fault
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
