"""LLaVA-1.5-7B (or Video-LLaVA-7B) on a CPU at full depth: weight-only int8 / int4, FastV off and on, and
llama.cpp beside it.

    python -m minifastv bench --quant int8 int4 [--family video-llava] [--layers 32] [--workdir DIR]
                              [--repeats 2] [--peer llama.cpp]

1. Builds a random LLaVA-1.5-7B-shaped checkpoint per method on disk, one tensor at a time (the float model is
   never in memory): float parts in fp16 as in the released checkpoints, decoder linears quantized by
   minifastv's own quantizer. It stays in --workdir for the next run.
2. Measures each in a fresh process, so that peak RSS is that run's own: load time from a warm page cache,
   time to first token (vision tower + prefill of LLaVA's 632-token prompt with one 576-token image) for
   FastV off, K=2 R=0.5 and K=2 R=0.75, the first run (weights paged in from the mapped files) apart from the
   median of the rest, decode tokens/s, and peak RSS. Float weights take the dtype `auto` picks (printed).
   --family video-llava: Video-LLaVA-7B's shape (CLIP ViT-L/14 at 224 px, an image tower and a video tower,
   vocabulary 32064) with one 8-frame video: 2,056 video tokens in a prompt of 2,112; the video tower's 8
   frames replace the image in the vision time.
3. The float reference: the same model with float linears and --ref-layers decoder layers (fp32 7B does not
   fit in 24 GiB), timed the same way and scaled to the full depth per layer.
4. --peer llama.cpp (needs the gguf package, `pip install -e ".[peer]"`, and llama.cpp's llama-bench and
   llama-quantize, on PATH or in --peer-bin): the same decoder as a GGUF with random weights, quantized by
   llama-quantize to Q8_0 and Q4_0 and timed by llama-bench (a prompt as long as minifastv's, 16 generated)
   with the same threads, in the same run. llama.cpp's figure is the decoder alone, without a vision tower
   (llama.cpp has no Video-LLaVA: for the video shape it is the decoder-only anchor at the same length).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..checkpoint import CONFIG, TOKENIZER, config_from_dict, empty_model, load
from ..config import LlavaConfig, QuantConfig
from ..files import ShardWriter, staged
from ..machine import auto_dtype, peak_rss_bytes, physical_cores, set_threads
from ..models.generate import stream
from ..models.video_llava import VIDEO_LLAVA_7B
from ..pruning import FastV, theoretical_flops
from ..quant import int8_gemm_exact, set_activations
from ..quant.linear import cpu_int4_block, quantized_tensors
from .machine import describe

METHODS = {"int8": QuantConfig("int8"), "int4": QuantConfig("int4", 128)}
SETTINGS = {"off": None, "K=2 R=0.5": FastV(2, 0.5), "K=2 R=0.75": FastV(2, 0.75)}
GiB = 2**30


FAMILIES = {"llava": ("LLaVA-1.5-7B", ""), "video-llava": ("Video-LLaVA-7B", "video-llava-")}  # name, files' prefix


def config_7b(layers: int, quant: QuantConfig | None, family: str = "llava") -> LlavaConfig:
    base = VIDEO_LLAVA_7B if family == "video-llava" else LlavaConfig.from_name("llava-1.5-7b")
    return dataclasses.replace(base, text=dataclasses.replace(base.text, n_layers=layers), quant=quant)


def write_tokenizer(path: Path):
    """A stand-in tokenizer.json (the prompt's ids are drawn at random; nothing is decoded)."""
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>")).save(str(path))


def build_checkpoint(path: Path, config: LlavaConfig, log) -> Path:
    """Random weights for `config`, written one tensor at a time; kept if it already exists."""
    if (path / CONFIG).is_file() and config_from_dict(json.loads((path / CONFIG).read_text())) == config:
        log(f"{path}: the checkpoint is there already, used as it is")
        return path
    log(f"{path}: writing a random checkpoint, one tensor at a time")
    start, g = time.perf_counter(), torch.Generator().manual_seed(0)
    float_config = dataclasses.replace(config, quant=None)
    with staged(path, True) as tmp:
        writer = ShardWriter(tmp)
        for name, meta in empty_model(float_config).state_dict().items():
            if "norm" in name and name.endswith("weight"):
                tensor = torch.ones(meta.shape)
            else:
                tensor = torch.randn(meta.shape, generator=g).mul_(0.02)
            for stored_name, stored in quantized_tensors(name, tensor, config.quant, torch.float16):
                writer.add(stored_name, stored)
        writer.close()
        (tmp / CONFIG).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        write_tokenizer(tmp / TOKENIZER)
    log(f"built {path} in {time.perf_counter() - start:.0f} s")
    return path


def random_prompt(config: LlavaConfig):
    """(ids, visual inputs): BOS, 35 system tokens, the image placeholder (a video model's: a video placeholder),
    20 question tokens: 632 tokens once LLaVA-1.5's image is widened, 2,112 once Video-LLaVA's 8 frames are."""
    g = torch.Generator().manual_seed(1)
    size, video = config.vision.image_size, getattr(config, "n_frames", None)
    placeholder = config.video_token_id if video else config.image_token_id
    words = [i for i in range(4, min(config.text.vocab_size, 30000)) if i not in (placeholder, config.image_token_id)]
    text = [words[i] for i in torch.randint(len(words), (55,), generator=g).tolist()]
    ids = [config.text.bos_token_id] + text[:35] + [placeholder] + text[35:]
    shape = (1, video, 3, size, size) if video else (1, 3, size, size)
    return torch.tensor([ids]), {"video_values" if video else "pixel_values": torch.randn(shape, generator=g)}


@torch.inference_mode()
def measure(path: Path, settings: list[str], repeats: int, decode_tokens: int, threads: int, dtype: str,
            activations: str = "float") -> dict:
    """Run in a fresh process: load the checkpoint, then time each FastV setting (int8 activations for an int8
    checkpoint if asked)."""
    set_threads(threads)
    start = time.perf_counter()
    model = load(path, dtype=dtype)
    if activations == "int8" and model.config.quant is not None and model.config.quant.method == "int8":
        set_activations(model, "int8")
    result = {"load_s": time.perf_counter() - start, "rss_after_load": peak_rss_bytes(),
              "dtype": str(model.dtype).removeprefix("torch."), "settings": {}}
    ids, visual = random_prompt(model.config)
    start = time.perf_counter()
    model.encode_videos(visual["video_values"]) if "video_values" in visual else model.encode_images(**visual)
    result["vision_s"] = time.perf_counter() - start
    result["prompt_tokens"] = model.merged_slots(ids)[1]
    for name in settings:
        runs = []
        for _ in range(repeats + 1):
            stamps = [time.perf_counter()]
            run = stream(model, ids, max_new_tokens=decode_tokens, prune=SETTINGS[name], **visual)
            for _ in run:
                stamps.append(time.perf_counter())
            runs.append((stamps[1] - stamps[0], (len(stamps) - 2) / (stamps[-1] - stamps[1])))
        result["settings"][name] = {
            "first_ttft_s": runs[0][0], "ttft_s": statistics.median(r[0] for r in runs[1:]),
            "ttft_spread_s": max(r[0] for r in runs[1:]) - min(r[0] for r in runs[1:]),
            "decode_tok_s": statistics.median(r[1] for r in runs[1:]),
            "kept": len(run.prefill.kept_image_slots()[0])}
    result["peak_rss"] = peak_rss_bytes()
    return result


def warm_page_cache(path: Path):
    """Read every file of a checkpoint once, so that load times are those of a warm page cache (the GGUF files
    of a previous --peer run are large enough to push a checkpoint out of it)."""
    for file in sorted(path.iterdir()):
        with open(file, "rb", buffering=0) as f:
            while f.read(64 << 20):
                pass


def measure_in_child(path: Path, settings, args, dtype: str = "auto", activations: str = "float") -> dict:
    warm_page_cache(path)
    cmd = [sys.executable, "-m", "minifastv.bench.cpu7b", "--child", str(path), "--settings", *settings,
           "--repeats", str(args.repeats),
           "--decode-tokens", str(args.decode_tokens), "--threads", str(args.threads), "--dtype", dtype,
           "--activations", activations]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def pack_for_this_cpu(path: Path, log):
    """Store the int4 checkpoint's weights in this CPU's kernel layout beside it (int4cpu.py), as a user would
    with `pack-cpu`, so that the load measured maps them; a fresh packed file is kept."""
    from ..checkpoint import load_config
    from ..quant.int4cpu import read_cpu_layout

    if cpu_int4_block() is None or read_cpu_layout(path, empty_model(load_config(path))) is not None:
        return
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "minifastv", "pack-cpu", str(path)], check=True, capture_output=True)
    log(f"{path}: wrote the int4 weights in this CPU's kernel layout in {time.perf_counter() - start:.0f} s")


def float_reference(args, log) -> dict:
    """The float model at --ref-layers depth, in fp32 and (where `auto` picks it) bf16; per-layer figures are
    scaled to --layers in the report."""
    prefix = FAMILIES[args.family][1]
    path = build_checkpoint(Path(args.workdir) / f"{prefix}float-{args.ref_layers}layers",
                            config_7b(args.ref_layers, None, args.family), log)
    chosen = args.dtype if args.dtype != "auto" else str(auto_dtype(torch.device("cpu"))[0]).removeprefix("torch.")
    dtypes = dict.fromkeys(["float32", chosen])
    return {dtype: measure_in_child(path, ["off", "K=2 R=0.5"], args, dtype) for dtype in dtypes}


def peer_llama_cpp(args, log) -> dict:
    from .llama_cpp import run_peer

    return run_peer(Path(args.workdir), args.layers, args.threads, args.decode_tokens, args.peer_bin, log,
                    prompt_tokens(getattr(args, "family", "llava")))


def prompt_tokens(family: str) -> int:
    """The benchmark prompt's length with its image or video widened: 632 (LLaVA-1.5), 2,112 (Video-LLaVA)."""
    config = config_7b(1, None, family)
    visual = config.n_frames * (config.vision.n_patches + 1) if family == "video-llava" else config.vision.n_patches
    return len(random_prompt(config)[0][0]) - 1 + visual


def pruning_share(layers: int) -> str:
    """FastV's theoretical prefill FLOPs at LLaVA-1.5's 632 tokens (576 image) and Video-LLaVA's 2,112 (2,056
    video): the share of the prefill that pruning saves grows with the visual tokens' share of the prompt."""
    cells = []
    for family, visual in (("llava", 576), ("video-llava", 2056)):
        text, n = config_7b(layers, None, family).text, prompt_tokens(family)
        flops = {name: theoretical_flops(text, n, visual, m) for name, m in SETTINGS.items() if m is not None}
        ratios = ", ".join(f"{name} {pruned / unpruned:.1%}" for name, (pruned, unpruned) in flops.items())
        cells.append(f"{n} tokens ({visual} visual): {ratios}")
    return "theoretical prefill FLOPs of FastV, relative to off: " + "; ".join(cells)


def report(args, results: dict, reference: dict, peer: dict | None):
    layers, ref_layers = args.layers, args.ref_layers
    family = getattr(args, "family", "llava")
    n = prompt_tokens(family)
    visual = "2056 video" if family == "video-llava" else "576 image"
    print(f"\n{FAMILIES[family][0]} shape, {layers} decoder layers, random weights; prompt {n} tokens ({visual}), "
          f"{args.decode_tokens} new tokens; medians of {args.repeats} runs after a first one")
    print("| linears | float dtype | FastV | image tokens kept | load s | first TTFT s | TTFT s (spread) | "
          "TTFT vs off | decode tok/s | peak RSS GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, r in results.items():
        off = r["settings"]["off"]["ttft_s"]
        for name, s in r["settings"].items():
            print(f"| {label} | {r['dtype']} | {name} | {s['kept']} | {r['load_s']:.1f} | {s['first_ttft_s']:.1f} | "
                  f"{s['ttft_s']:.1f} ({s['ttft_spread_s']:.1f}) | {off / s['ttft_s']:.2f}x | "
                  f"{s['decode_tok_s']:.2f} | {r['peak_rss'] / GiB:.2f} |")
    for ref in reference.values():
        scale = lambda t: ref["vision_s"] + (t - ref["vision_s"]) * layers / ref_layers  # noqa: E731,B023
        for name, s in ref["settings"].items():
            decode = s["decode_tok_s"] * ref_layers / layers  # decode time grows with the layers
            print(f"| float, {ref_layers} layers scaled to {layers} | {ref['dtype']} | {name} | {s['kept']} | - | - | "
                  f"{scale(s['ttft_s']):.1f} | - | {decode:.2f} | - |")
    first = next(iter(reference.values()))
    tower = "8 frames of CLIP ViT-L/14-224" if family == "video-llava" else "CLIP ViT-L/14-336"
    print(f"vision tower ({tower}, 23 blocks) alone: {first['vision_s']:.2f} s in {first['dtype']}")
    print(pruning_share(layers))
    for label, r in results.items():
        off = r["settings"]["off"]["ttft_s"]
        saved = ", ".join(f"{name} {1 - s['ttft_s'] / off:.0%}" for name, s in r["settings"].items() if name != "off")
        print(f"measured TTFT saved at {n} tokens, {label}: {saved}")
    if peer:
        print(f"\nllama.cpp {peer['build']} (llama-bench, same machine and threads, decoder only, no vision tower)")
        print(f"| llama.cpp | prompt {n} tokens s | decode tok/s | peak RSS GiB |\n|---|---|---|---|")
        for name, p in peer["runs"].items():
            print(f"| {name} | {n / p['pp_tok_s']:.1f} | {p['tg_tok_s']:.2f} | {p['peak_rss'] / GiB:.2f} |")
        for label, r in results.items():
            peer_name = {"int8": "Q8_0", "int4": "Q4_0"}[label.split()[0]]
            if peer_name in peer["runs"]:
                p = peer["runs"][peer_name]
                cells = ", ".join(f"{name} {s['ttft_s'] * p['pp_tok_s'] / n:.2f}x" for name, s in r["settings"].items())
                decode = ", ".join(f"{s['decode_tok_s'] / p['tg_tok_s']:.2f}x" for s in r["settings"].values())
                print(f"minifastv {label} / llama.cpp {peer_name}: TTFT / prompt time {cells}; decode speed {decode}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m minifastv bench --quant", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quant", nargs="+", choices=list(METHODS), default=["int8", "int4"])
    p.add_argument("--family", choices=list(FAMILIES), default="llava",
                   help="llava: LLaVA-1.5-7B, one image (632 tokens); video-llava: Video-LLaVA-7B, one 8-frame video "
                        "(2,112 tokens)")
    p.add_argument("--layers", type=int, default=32, help="decoder layers (LLaVA-1.5-7B has 32)")
    p.add_argument("--ref-layers", type=int, default=4, help="decoder layers of the float reference")
    p.add_argument("--workdir", default="/tmp/minifastv-bench", help="where the generated checkpoints are kept")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=physical_cores())
    p.add_argument("--peer", choices=["llama.cpp"], help="time llama.cpp on the same shapes in the same run")
    p.add_argument("--peer-bin", help="directory holding llama-bench and llama-quantize (default: PATH)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="auto", help="float weights' dtype (default: auto, as minifastv.load picks)")
    p.add_argument("--activations", nargs="+", choices=["float", "int8"], default=["float"],
                   help="the int8 checkpoint measured with each: float (weight-only) and/or int8 activations "
                        "(int4 stays weight-only)")
    args = p.parse_args(argv)
    for flag, value, least in (("--repeats", args.repeats, 1), ("--decode-tokens", args.decode_tokens, 2),
                               ("--threads", args.threads, 1), ("--layers", args.layers, 1),
                               ("--ref-layers", args.ref_layers, 1)):
        if value < least:  # decode speed is timed between the first and the last new token: two at least
            raise ValueError(f"{flag} must be at least {least}, got {value}")
    if "int8" in args.activations and "int8" in args.quant and not int8_gemm_exact():
        raise ValueError("--activations int8: not available on this CPU (its integer GEMM saturates on full-range "
                         "int8 weights; see minifastv/int8act.py); measure with --activations float")
    if args.child:
        print(json.dumps(measure(Path(args.child), args.settings, args.repeats, args.decode_tokens, args.threads,
                                 args.dtype, args.activations[0])))
        return 0
    start = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - start:7.1f} s] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    print(describe(args.threads))
    print(f"command: python -m minifastv bench {' '.join(sys.argv[1:] if argv is None else argv)}")
    results = {}
    for method in args.quant:
        path = build_checkpoint(Path(args.workdir) / f"{FAMILIES[args.family][1]}{method}-{args.layers}layers",
                                config_7b(args.layers, METHODS[method], args.family), log)
        log(f"{method}: measuring {', '.join(SETTINGS)} ({args.repeats} runs after a first one, {args.decode_tokens} "
            f"new tokens) in a child process per activation type")
        if method == "int4":
            pack_for_this_cpu(path, log)
        for activations in args.activations if method == "int8" else ["float"]:
            label = method + (" + int8 activations" if activations == "int8" else "")
            results[label] = measure_in_child(path, list(SETTINGS), args, args.dtype, activations)
            log(f"{label}: {json.dumps(results[label])}")
    log(f"float reference: {args.ref_layers} decoder layers")
    reference = float_reference(args, log)
    log(f"float reference: {json.dumps(reference)}")
    peer = peer_llama_cpp(args, log) if args.peer else None
    report(args, results, reference, peer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
