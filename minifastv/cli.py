"""`python -m minifastv ...`: generate with a checkpoint, or a self-contained demo of FastV's mechanics."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "weights" / "tiny"


def fastv_from_args(args):
    from .fastv import FastV

    if args.fastv_k is None:
        return None
    return FastV(args.fastv_k, args.fastv_ratio)


def report(model, pre_fastv_len: int, n_image: int, fastv, kept: int, seconds: float):
    from .fastv import theoretical_flops

    with_fastv, full = theoretical_flops(model.config.text, pre_fastv_len, n_image, fastv)
    print(f"tokens: {pre_fastv_len} in the prompt, {n_image} of them image tokens; "
          f"{kept} image tokens kept after layer {fastv.k if fastv else '-'}")
    print(f"theoretical prefill FLOPs: {with_fastv / full:.1%} of the unpruned model; time {seconds * 1e3:.1f} ms")


def cmd_generate(args):
    from .checkpoint import load
    from .generate import stream
    from .image import load_image, preprocess
    from .tokenizer import chat_prompt

    model = load(args.model, dtype=args.dtype)
    cfg = model.config
    pixels = torch.stack([preprocess(load_image(p), cfg.vision.image_size, cfg.image_mode, cfg.image_mean,
                                     cfg.image_std) for p in args.image])
    ids = torch.tensor([model.tokenizer.encode_prompt(chat_prompt(args.prompt, n_images=len(args.image)))])
    fastv = fastv_from_args(args)
    start = time.perf_counter()
    out = []
    for tokens, _ in stream(model, ids, pixels, max_new_tokens=args.max_new_tokens, fastv=fastv,
                            temperature=args.temperature, eos_token_id=cfg.text.eos_token_id):
        if int(tokens[0]) == cfg.text.eos_token_id:
            break
        out.append(int(tokens[0]))
        print(model.tokenizer.decode(out[-1:]), end=" ", flush=True)
    print()
    n_image = len(args.image) * cfg.vision.n_patches
    kept = fastv.n_kept(n_image) if fastv else n_image
    report(model, ids.shape[1] + n_image - len(args.image), n_image, fastv, kept, time.perf_counter() - start)


def cmd_demo(args):
    """A seeded random model of a preset's shape: shows pruning, FLOPs and timing, not meaningful text."""
    from .config import LlavaConfig
    from .fastv import FastV
    from .llava import LlavaModel

    torch.manual_seed(0)
    cfg = LlavaConfig.from_name(args.preset)
    model = LlavaModel(cfg).eval()
    n_image = cfg.vision.n_patches
    ids = torch.randint(4, cfg.text.vocab_size, (1, 40))
    ids[0, 0], ids[0, 10] = cfg.text.bos_token_id, cfg.image_token_id
    pixels = torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size)
    print(f"random '{args.preset}' model (trained weights ship with weights/tiny); prompt of 39 text tokens + 1 image")
    for fastv in (None, FastV(args.fastv_k, args.fastv_ratio)):
        start = time.perf_counter()
        with torch.inference_mode():
            new = model.generate(ids, pixels, max_new_tokens=8, fastv=fastv)
        print(f"\nFastV {'off' if fastv is None else f'K={fastv.k} R={fastv.ratio}'}: generated ids {new[0].tolist()}")
        report(model, 39 + n_image, n_image, fastv, fastv.n_kept(n_image) if fastv else n_image,
               time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minifastv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def fastv_flags(p, k=None):
        p.add_argument("--fastv-k", type=int, default=k, help="prune after this layer (off when not given)")
        p.add_argument("--fastv-ratio", type=float, default=0.5, help="fraction of image tokens dropped")

    g = sub.add_parser("generate", help="answer a question about one or more images")
    g.add_argument("--model", default=str(DEFAULT_MODEL), help="minifastv checkpoint directory")
    g.add_argument("--image", action="append", required=True, help="image file (repeat for several)")
    g.add_argument("--prompt", required=True, help="the question")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None)
    fastv_flags(g)
    g.set_defaults(run=cmd_generate)

    d = sub.add_parser("demo", help="FastV on a seeded random model: kept tokens, FLOPs, time")
    d.add_argument("--preset", default="tiny")
    fastv_flags(d, k=2)
    d.set_defaults(run=cmd_demo)

    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
