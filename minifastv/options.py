"""The command line's options that several subcommands share, and how they become library objects."""

from __future__ import annotations

import sys
import time

import torch

from .config_checks import INT4_GROUP_SIZES, QUANT_METHODS
from .data import TINY_MODEL
from .image import tokens_per_image
from .machine import DTYPES, physical_cores

DEFAULT_GROUP_SIZE = 128


def model_arguments(p, default_method="none", anyres: bool = False):
    """--model, the pruning method, and the machine (dtype, device, threads) for subcommands that run a model
    (anyres: with --anyres, the treatments of LLaVA-NeXT's packed image tokens)."""
    from .pruning import METHODS
    from .pruning.anyres_parts import TREATMENTS

    p.add_argument("--model", default=str(TINY_MODEL),
                   help="minifastv checkpoint directory (default: the shipped tiny model)")
    p.add_argument("--prune", choices=list(METHODS),
                   help=f"visual-token pruning method (default: {default_method})")
    p.add_argument("--prune-ratio", type=float,
                   help="what the method drops (default 0.5): the fraction R of the visual tokens, once (1-R kept: "
                        "32 of 64 at 0.5); pyramiddrop(-official): R of those left at each of its 3 stages "
                        "((1-R)^3 kept at the end: 8 of 64 at 0.5); dart-official: whole shares per pivot plus its 4 "
                        "image pivots (36 of 64 at 0.5). The answer's summary and --json say how many were kept")
    p.add_argument("--prune-k", type=int,
                   help="the layer the method prunes after, where it has one (default: the method's, 2)")
    p.add_argument("--prune-seed", type=int, help="seed, for methods that draw at random (default 0)")
    p.add_argument("--fastv-k", type=int, help="FastV's spelling: --prune fastv --prune-k K")
    p.add_argument("--fastv-ratio", type=float, help="FastV's spelling: --prune-ratio R (with --fastv-k)")
    if anyres:
        p.add_argument("--anyres", choices=list(TREATMENTS),
                       help="LLaVA-NeXT: how the method treats an image's packed tokens (default: one set, base image, "
                            "tiles and row-ending newlines alike, as transformers lays them out); newlines-kept: every "
                            "newline kept within the budget; views-apart: base image and tiles each keep their share")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="float weights' dtype; auto: bf16 where the CPU (or GPU) computes it natively, "
                        "else fp32 (default: %(default)s)")
    p.add_argument("--activations", choices=["float", "int8"], default="float",
                   help="int8: an int8 checkpoint rounds the activations to int8 too and multiplies in integers, "
                        "prefill and decode (needs AVX-512 VNNI; default: %(default)s, weight-only)")
    p.add_argument("--kv-cache", choices=["float", "int8"], default="float",
                   help="int8: keys and values cached in int8 (one scale per token and head), and decode steps' "
                        "attention read from the int8 bytes: a quarter of the fp32 cache's reads, faster decode "
                        "after long prompts; CPU only, not for serve (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None,
                   help=f"CPU threads (default: the physical cores, {physical_cores()} here)")
    p.add_argument("--check-weights", action="store_true",
                   help="scan every weight for NaN/inf while loading (conversion already does)")
    p.add_argument("--frames", type=int, help="frames sampled from each video, for a video model without temporal "
                                              "attention (default: the checkpoint's n_frames)")


def pruner_from_args(args, default=None):
    """The pruning method the command line asks for: --prune NAME with --prune-ratio/--prune-k/--prune-seed,
    or FastV's own spelling --fastv-k K [--fastv-ratio R]; `default` when neither is given (and the method
    that --prune-* settings alone apply to); with --anyres, the method in that treatment."""
    prune_opts = [f"--prune-{n}" for n in ("ratio", "k", "seed") if getattr(args, f"prune_{n}") is not None]
    check_seed("--prune-seed", args.prune_seed)
    fastv_opts = [f"--fastv-{n}" for n in ("k", "ratio") if getattr(args, f"fastv_{n}") is not None]
    if fastv_opts and (args.prune is not None or prune_opts):
        raise ValueError(f"{' and '.join(fastv_opts)} {'is' if len(fastv_opts) == 1 else 'are'} FastV's own "
                         "spelling and cannot be mixed with --prune: use --prune-ratio and --prune-k")
    method = chosen_method(args, default, prune_opts, fastv_opts)
    treatment = getattr(args, "anyres", None)
    if treatment is None:
        return method
    if method is None:
        raise ValueError(f"--anyres {treatment} treats a pruning method's choice: give one (--prune NAME)")
    from .pruning.anyres_parts import TREATMENTS, AnyresParts

    return AnyresParts(method, **TREATMENTS[treatment])


def chosen_method(args, default, prune_opts: list[str], fastv_opts: list[str]):
    from .pruning import FastV, make, name_of

    name = args.prune
    if name is None and prune_opts:
        if default is None:
            raise ValueError(f"{', '.join(prune_opts)} given without --prune NAME (the pruning method)")
        name = name_of(default)
    if name is not None:
        return make(name, 0.5 if args.prune_ratio is None else args.prune_ratio, args.prune_k, args.prune_seed)
    if args.fastv_k is None and args.fastv_ratio is not None and default is None:
        raise ValueError("--fastv-ratio needs --fastv-k (the layer FastV prunes after; the paper's is 2)")
    if fastv_opts:
        k, ratio = 2 if args.fastv_k is None else args.fastv_k, 0.5 if args.fastv_ratio is None else args.fastv_ratio
        return FastV(k, ratio)
    return default


def check_pruning(method, config, asked: bool) -> None:
    """A pruning setting that changes nothing on this model: an error when the command line asked for it (a
    layer at or past the decoder's depth cannot be meant), a warning when it is a subcommand's default. One
    that keeps no image token at all is said once, on stderr."""
    import sys

    from .pruning import active_stages
    from .pruning.base import stage_counts

    if method is None:
        return
    n_layers = config.text.n_layers
    stages = active_stages(method, n_layers)
    if not stages:
        message = (f"{describe(method)} prunes nothing here: the model has {n_layers} decoder layers and the "
                   "method's pruning falls after the last one")
        if asked:
            raise ValueError(message + (f" (--prune-k must be below {n_layers})" if hasattr(method, "k") else ""))
        print(f"warning: {message}", file=sys.stderr)
        return
    n = per_image = tokens_per_image(config)
    for stage in stages.values():
        n = stage_counts(method, stage, [n], [per_image])[0]
    if n == 0:
        print(f"warning: {describe(method)} keeps 0 of an image's {per_image} tokens: the model "
              "answers without seeing the image", file=sys.stderr)


def pruning_asked(args) -> bool:
    return any(getattr(args, name) is not None for name in ("prune", "prune_k", "prune_ratio", "fastv_k", "fastv_ratio"))


def describe(method) -> str:
    """'FastV K=2 R=0.5': the method and its settings."""
    from dataclasses import fields

    if hasattr(method, "keep_newlines"):   # an anyres treatment around a method
        return f"{describe(method.method)}, {method.name}"
    names = {"k": "K", "ratio": "R"}
    return type(method).__name__ + "".join(f" {names.get(f.name, f.name)}={getattr(method, f.name)}"
                                            for f in fields(method))


def sampling_arguments(p, max_new_tokens: int):
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="(default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0: greedy; above 0 the logits are divided by it before sampling (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="sample from the smallest set of tokens holding this much probability (default: %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling: the same seed, the same answer")


SEED_RANGE = 2**64  # what torch.Generator.manual_seed takes


def check_seed(flag: str, seed: int | None):
    if seed is not None and not 0 <= seed < SEED_RANGE:
        raise ValueError(f"{flag} must be in [0, 2**64), got {seed}")


def sampling_from_args(args, device) -> dict:
    """The sampling keyword arguments of Pipeline.answer / answer_batch / Chat from sampling_arguments."""
    check_seed("--seed", args.seed)
    generator = None if args.seed is None else torch.Generator(device).manual_seed(args.seed)
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
            "generator": generator}


def add_convert_arguments(p):
    p.add_argument("src", help="source checkpoint directory (config.json + weights)")
    p.add_argument("out", help="output directory (must not exist unless --force)")
    p.add_argument("--vision-tower", help="CLIP checkpoint directory, for original LLaVA checkpoints without one")
    p.add_argument("--image-tower", help="LanguageBind_Image directory, for an original Video-LLaVA checkpoint")
    p.add_argument("--video-tower", help="LanguageBind_Video_merge directory, for an original Video-LLaVA checkpoint "
                                         "(its temporal attention included)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="output dtype (default: the source config's dtype, else float32)")
    p.add_argument("--tokenizer", help="tokenizer.json to ship (default: SRC/tokenizer.json)")
    p.add_argument("--clip-text", metavar="DIR", help="a full CLIP checkpoint (transformers layout, e.g. "
                   "openai/clip-vit-large-patch14-336) whose text tower joins the model, for cdpruner")
    p.add_argument("--quantize", choices=QUANT_METHODS, help="weight-only quantization of the decoder's linears "
                   "(int8: a scale per output channel; int4: a scale and zero point per group of inputs)")
    add_output_arguments(p)


def add_output_arguments(p):
    p.add_argument("--group-size", type=int, default=None,
                   help=f"int4: inputs per scale and zero point, one of {', '.join(map(str, INT4_GROUP_SIZES))} "
                        f"(default {DEFAULT_GROUP_SIZE})")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--max-shard-gb", type=float, default=2.0, help="output shard size in GB (default: %(default)s)")


def shard_bytes(args) -> int:
    """--max-shard-gb in bytes; a size of 0 or less would write one file per tensor."""
    if not args.max_shard_gb > 0:
        raise ValueError(f"--max-shard-gb must be above 0, got {args.max_shard_gb}")
    return int(args.max_shard_gb * 2**30)


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


def load_pipeline(args):
    """Threads, device and dtype from the command line, then the checkpoint; says what it chose on stderr."""
    from .machine import peak_rss_bytes, resolve_device, resolve_dtype, set_threads
    from .pipeline import Pipeline

    threads = set_threads(args.threads)
    device = resolve_device(args.device)
    start = time.perf_counter()
    pipe = Pipeline.load(args.model, dtype=args.dtype, device=device, check=args.check_weights)
    model = pipe.model
    why = resolve_dtype(args.dtype, device, model.config)[1]
    if args.activations != "float":
        from .quant import set_activations

        set_activations(model, args.activations)
    if args.kv_cache != "float":
        from .models import set_kv_cache

        set_kv_cache(model, args.kv_cache)
    if getattr(args, "frames", None) is not None:
        pipe.use_frames(args.frames)
    seconds, rss = time.perf_counter() - start, peak_rss_bytes()
    quant = model.config.quant
    print(f"{args.model}: {'float' if quant is None else quant.method} decoder linears"
          f"{', int8 activations' if args.activations == 'int8' else ''}"
          f"{', int8 KV cache' if args.kv_cache == 'int8' else ''}, "
          f"{str(model.dtype).removeprefix('torch.')} float weights ({why}), {device}"
          + (f", {threads} threads" if device.type == "cpu" else "")
          + f"; loaded in {seconds:.2f} s" + ("" if rss is None else f", peak RSS {rss / 2**30:.2f} GiB"),
          file=sys.stderr)
    if model.kernel_choice is not None:
        print(model.kernel_choice.describe(), file=sys.stderr)
    return pipe
