"""LLaVA-1.5-7B or -13B (or Video-LLaVA-7B, LLaVA-NeXT-7B/13B, Qwen-VL-Chat-7B) on a CPU at full depth: weight-only
int8 / int4, FastV off and on, and llama.cpp beside it.

    python -m minifastv bench --quant int8 int4 [--family llava|video-llava|llava-next|qwen-vl] [--size 7b|13b]
                              [--layers N] [--workdir DIR] [--repeats 2] [--peer llama.cpp]

1. Builds a random checkpoint of the shape per method on disk, one tensor at a time (the float model is never
   in memory): float parts in fp16 as in the released checkpoints, decoder linears quantized by minifastv's
   own quantizer. It stays in --workdir for the next run.
2. Measures each in a fresh process, so that peak RSS is that run's own: load time from a warm page cache,
   time to first token (vision tower + prefill of LLaVA's 632-token prompt with one 576-token image) for
   FastV off, K=2 R=0.5 and K=2 R=0.75, the first run (weights paged in from the mapped files) apart from the
   median of the rest, decode tokens/s, the time to a short answer (TTFT, then 32 tokens at that speed), the
   share of the prefill (TTFT less the vision tower) spent in the decoder's attention (SDPA, timed in the first
   run), and peak RSS. Float weights take the dtype `auto` picks (printed).
   --size 13b: LLaVA-1.5-13B's decoder (40 layers, 5120 wide), the same prompt.
   --family video-llava: Video-LLaVA-7B's shape (CLIP ViT-L/14 at 224 px, an image tower and a video tower,
   vocabulary 32064) with one 8-frame video: 2,056 video tokens in a prompt of 2,112; the video tower's 8
   frames replace the image in the vision time.
   --family llava-next: LLaVA-NeXT's shape (llava-v1.6-vicuna) with one 672 x 672 image, its base image and
   four tiles through the tower: 2,928 image tokens in a prompt of 2,984, and one more setting, FastV at K=2
   keeping 320 of them (the budget recent papers report at this length).
   --family qwen-vl: Qwen-VL-Chat's shape (the ViT-bigG-style tower at 448 px, 48 blocks, and the resampler; the
   Qwen-7B decoder, vocabulary 151,936) with one image: 256 image tokens between <img> and </img>, 314 in all.
   --activations float int8 measures the int8 checkpoint with weight-only and with int8 activations; --kv-cache
   float int8 each checkpoint with the float (fp32 on a CPU) and with the int8 KV cache (models/cache_int8.py).
   --settings off 'K=2 R=0.5' measures only those (at 2,984 tokens each setting of each checkpoint takes minutes).
3. The float reference: the same model with float linears and --ref-layers decoder layers (fp32 7B does not
   fit in 24 GiB), timed the same way and scaled to the full depth per layer; --ref-layers 0 leaves it out.
4. --peer llama.cpp (needs the gguf package, `pip install -e ".[peer]"`, and llama.cpp's llama-bench and
   llama-quantize, on PATH or in --peer-bin): the same decoder as a GGUF with random weights, quantized by
   llama-quantize to Q8_0 (beside int8) and Q4_0 (beside int4), as --quant asks, and timed by llama-bench (a prompt
   as long as minifastv's; then --decode-tokens generated after one)
   with the same threads, in the same run. llama.cpp's figure is the decoder alone, without a vision tower
   (llama.cpp has no Video-LLaVA: for the video shape it is the decoder-only anchor at the same length; for
   Qwen-VL a LLaMA decoder of Qwen-7B's shape and vocabulary, without its q, k, v bias).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import anyres
from ..checkpoint import CONFIG, TOKENIZER, config_from_dict, empty_model, load
from ..config import LlavaConfig, QuantConfig
from ..files import ShardWriter, staged
from ..image import tokens_per_image
from ..machine import auto_dtype, peak_rss_bytes, physical_cores, set_threads
from ..models import llama, set_kv_cache
from ..models.generate import stream
from ..models.llava_next import LlavaNextConfig
from ..models.qwen_vl import QWEN_VL_CHAT
from ..models.video_llava import VIDEO_LLAVA_7B
from ..pruning import FastV, theoretical_flops
from ..quant import int8_gemm_exact, set_activations
from ..quant.linear import cpu_int4_block, quantized_tensors
from .llama_cpp import PEER_OF, PeerError, find_tool, run_peer
from .machine import describe

METHODS = {"int8": QuantConfig("int8"), "int4": QuantConfig("int4", 128)}
NEXT_IMAGE = (672, 672)   # a LLaVA-NeXT image (height, width): base image + 2 x 2 tiles, 2,928 tokens
SETTINGS = {"off": None, "K=2 R=0.5": FastV(2, 0.5), "K=2 R=0.75": FastV(2, 0.75),
            "K=2 320 kept": FastV(2, 1 - 320 / 2928)}   # LLaVA-NeXT only: 320 of its 2,928 image tokens
GiB = 2**30
ANSWER_TOKENS = 32   # the user-facing figure: how long a short answer takes, its first token and 32 more
PAPER_FLOPS_CUT_13B = 0.45   # FastV's abstract: K=2 R=50% cuts LLaVA-1.5-13B's FLOPs by 45%

FAMILIES = {"llava": ("LLaVA-1.5", ""), "video-llava": ("Video-LLaVA", "video-llava-"),   # name, files' prefix
            "llava-next": ("LLaVA-NeXT", "llava-next-"), "qwen-vl": ("Qwen-VL-Chat", "qwen-vl-")}
ONLY_7B = ("video-llava", "qwen-vl")   # families without a 13B model
TOWERS = {"llava": "CLIP ViT-L/14-336, 23 blocks", "video-llava": "8 frames of CLIP ViT-L/14-224, 23 blocks",
          "llava-next": "CLIP ViT-L/14-336 on a base image and 4 tiles, 23 blocks",
          "qwen-vl": "ViT-bigG-style at 448 px, 48 blocks, and the resampler"}
SIZES = {"7b": "llava-1.5-7b", "13b": "llava-1.5-13b"}   # the decoder's preset


def settings_of(family: str) -> list[str]:
    """The FastV settings measured for a family: off, R=0.5, R=0.75, and for LLaVA-NeXT a 320-token budget."""
    return [name for name in SETTINGS if name != "K=2 320 kept" or family == "llava-next"]


def bench_config(layers: int | None, quant: QuantConfig | None, family: str = "llava", size: str = "7b") -> LlavaConfig:
    """The benchmarked shape, with `layers` decoder layers (None: the model's own depth)."""
    if family in ONLY_7B and size != "7b":
        raise ValueError(f"--size {size}: {FAMILIES[family][0]} has a 7B model only")
    base = LlavaConfig.from_name(SIZES[size])
    if family in ONLY_7B:
        base = VIDEO_LLAVA_7B if family == "video-llava" else QWEN_VL_CHAT
    elif family == "llava-next":
        base = LlavaNextConfig(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)})
    layers = base.text.n_layers if layers is None else layers
    return dataclasses.replace(base, text=dataclasses.replace(base.text, n_layers=layers), quant=quant)


def shape_name(family: str, size: str = "7b") -> str:
    return f"{FAMILIES[family][0]}-{size.upper()}"


def checkpoint_name(family: str, size: str, what: str, layers: int) -> str:
    return f"{FAMILIES[family][1]}{'' if size == '7b' else size + '-'}{what}-{layers}layers"


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
        model = empty_model(float_config)
        buffers = dict(model.named_buffers())   # fixed tables (Qwen-VL's sin-cos), stored in their own dtype
        for name, meta in model.state_dict().items():
            if "norm" in name and name.endswith("weight"):
                tensor = torch.ones(meta.shape)
            else:
                tensor = torch.randn(meta.shape, generator=g).mul_(0.02)
            if name in buffers:
                writer.add(name, tensor.to(meta.dtype))
                continue
            for stored_name, stored in quantized_tensors(name, tensor, config.quant, torch.float16):
                writer.add(stored_name, stored)
        writer.close()
        (tmp / CONFIG).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        write_tokenizer(tmp / TOKENIZER)
    log(f"built {path} in {time.perf_counter() - start:.0f} s")
    return path


def random_prompt(config: LlavaConfig):
    """(ids, visual inputs): BOS, 35 system tokens, the image placeholder (a video model's: a video placeholder;
    LLaVA-NeXT's: one per image token; Qwen-VL's: between <img> and </img>), 20 question tokens: 632 tokens once
    LLaVA-1.5's image is widened, 2,112 once Video-LLaVA's 8 frames are, 2,984 with LLaVA-NeXT's 672 x 672 image,
    314 with Qwen-VL's."""
    g = torch.Generator().manual_seed(1)
    size, video = config.vision.image_size, getattr(config, "n_frames", None)
    placeholder = config.video_token_id if video else config.image_token_id
    around = [getattr(config, "image_start_id", None), placeholder, getattr(config, "image_end_id", None)]
    special = (*around, config.image_token_id)
    words = [i for i in range(4, min(config.text.vocab_size, 30000)) if i not in special]
    text = [words[i] for i in torch.randint(len(words), (55,), generator=g).tolist()]
    if isinstance(config, LlavaNextConfig):
        h, w = NEXT_IMAGE
        n_tiles = 1 + anyres.n_tiles(h, w, size, config.pinpoints)
        ids = [config.text.bos_token_id] + text[:35] + [placeholder] * config.n_image_tokens(h, w) + text[35:]
        return torch.tensor([ids]), {"pixel_values": torch.randn((n_tiles, 3, size, size), generator=g),
                                     "image_sizes": torch.tensor([[h, w]])}
    ids = [config.text.bos_token_id] + text[:35] + [i for i in around if i is not None] + text[35:]
    shape = (1, video, 3, size, size) if video else (1, 3, size, size)
    return torch.tensor([ids]), {"video_values" if video else "pixel_values": torch.randn(shape, generator=g)}


def encode_visual(model, visual: dict):
    """The vision tower and projector alone on the prompt's image or video."""
    if "video_values" in visual:
        return model.encode_videos(visual["video_values"])
    if "image_sizes" in visual:
        return model.encode_anyres(**visual)
    return model.encode_images(**visual)


@torch.inference_mode()
def measure(path: Path, settings: list[str], repeats: int, decode_tokens: int, threads: int, dtype: str,
            activations: str = "float", kv_cache: str = "float") -> dict:
    """Run in a fresh process: load the checkpoint, then time each FastV setting (int8 activations for an int8
    checkpoint, and an int8 KV cache, if asked)."""
    set_threads(threads)
    start = time.perf_counter()
    model = load(path, dtype=dtype)
    probe_s = 0.0   # a first load on this machine probes the kernels (quant/kernels.py): not part of the load time
    if model.kernel_choice is not None:
        probe_s += model.kernel_choice.probe_s
        if activations == "int8" and model.config.quant.method == "int8":
            set_activations(model, "int8")
            probe_s += model.kernel_choice.probe_s
    set_kv_cache(model, kv_cache)
    result = {"load_s": time.perf_counter() - start - probe_s, "rss_after_load": peak_rss_bytes(),
              "dtype": str(model.dtype).removeprefix("torch."), "settings": {},
              "kernels": model.kernel_choice and model.kernel_choice.describe()}
    ids, visual = random_prompt(model.config)
    start = time.perf_counter()
    encode_visual(model, visual)
    result["vision_s"] = time.perf_counter() - start
    result["prompt_tokens"] = model.merged_slots(ids)[1]
    for name in settings:
        runs, attention = [], TimedAttention()
        for i in range(repeats + 1):
            stamps = [time.perf_counter()]
            run = stream(model, ids, max_new_tokens=decode_tokens, prune=SETTINGS[name], **visual)
            tokens = iter(run)
            with attention.timing(i == 0):   # the first run's prefill: how long the decoder's attention takes
                next(tokens)
            stamps.append(time.perf_counter())
            for _ in tokens:
                stamps.append(time.perf_counter())
            runs.append((stamps[1] - stamps[0], (len(stamps) - 2) / (stamps[-1] - stamps[1])))
        ttft = statistics.median(r[0] for r in runs[1:])
        result["settings"][name] = {
            "first_ttft_s": runs[0][0], "ttft_s": ttft,
            "ttft_spread_s": max(r[0] for r in runs[1:]) - min(r[0] for r in runs[1:]),
            "decode_tok_s": statistics.median(r[1] for r in runs[1:]),
            "attention_s": attention.seconds, "kept": len(run.prefill.kept_image_slots()[0])}
    result["peak_rss"] = peak_rss_bytes()
    return result


class TimedAttention:
    """Times the decoder's attention (torch's scaled_dot_product_attention as models/llama.py calls it: scores,
    softmax and the weighted sum, the part of a prefill that grows with the square of its length) while timing();
    its projections count as linears, not as attention."""

    def __init__(self):
        self.seconds = 0.0

    def __getattr__(self, name):   # the rest of torch.nn.functional, as it is
        return getattr(F, name)

    def scaled_dot_product_attention(self, *args, **kwargs):
        start = time.perf_counter()
        y = F.scaled_dot_product_attention(*args, **kwargs)
        self.seconds += time.perf_counter() - start
        return y

    @contextlib.contextmanager
    def timing(self, on: bool = True):
        if not on:
            yield
            return
        llama.F = self
        try:
            yield
        finally:
            llama.F = F


def warm_page_cache(path: Path):
    """Read every file of a checkpoint once, so that load times are those of a warm page cache (the GGUF files
    of a previous --peer run are large enough to push a checkpoint out of it)."""
    for file in sorted(path.iterdir()):
        with open(file, "rb", buffering=0) as f:
            while f.read(64 << 20):
                pass


def measure_in_child(path: Path, settings, args, dtype: str = "auto", activations: str = "float",
                     kv_cache: str = "float") -> dict:
    warm_page_cache(path)
    cmd = [sys.executable, "-m", "minifastv.bench.cpu7b", "--child", str(path), "--settings", *settings,
           "--repeats", str(args.repeats),
           "--decode-tokens", str(args.decode_tokens), "--threads", str(args.threads), "--dtype", dtype,
           "--activations", activations, "--kv-cache", kv_cache]
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
    path = build_checkpoint(Path(args.workdir) / checkpoint_name(args.family, args.size, "float", args.ref_layers),
                            bench_config(args.ref_layers, None, args.family, args.size), log)
    chosen = args.dtype if args.dtype != "auto" else str(auto_dtype(torch.device("cpu"))[0]).removeprefix("torch.")
    dtypes = dict.fromkeys(["float32", chosen])
    return {dtype: measure_in_child(path, ["off", "K=2 R=0.5"], args, dtype) for dtype in dtypes}


def peer_llama_cpp(args, log) -> dict:
    """llama.cpp's figures for the types --quant compares with (Q8_0 for int8, Q4_0 for int4)."""
    text = bench_config(args.layers, None, args.family, args.size).text
    return run_peer(Path(args.workdir), text, args.threads, args.decode_tokens, args.peer_bin, log,
                    prompt_tokens(args.family, args.size), name=f"llama{args.size}-vocab{text.vocab_size}",
                    types=tuple(PEER_OF[method] for method in args.quant))


def visual_tokens(config: LlavaConfig) -> int:
    """The benchmark prompt's visual tokens: 576 (one LLaVA-1.5 image), 2,056 (Video-LLaVA's 8 frames with
    their class tokens), 2,928 (LLaVA-NeXT's 672 x 672 image), 256 (Qwen-VL's resampled image)."""
    if isinstance(config, LlavaNextConfig):
        return config.n_image_tokens(*NEXT_IMAGE)
    video = getattr(config, "n_frames", None)
    return video * (config.vision.n_patches + 1) if video else tokens_per_image(config)


def prompt_tokens(family: str, size: str = "7b") -> int:
    """The benchmark prompt's length with its image or video widened: 632 (LLaVA-1.5), 2,112 (Video-LLaVA),
    2,984 (LLaVA-NeXT), 314 (Qwen-VL)."""
    config = bench_config(1, None, family, size)
    ids = random_prompt(config)[0][0]
    return len(ids) if isinstance(config, LlavaNextConfig) else len(ids) - 1 + visual_tokens(config)


def pruning_share(layers: int, size: str = "7b") -> str:
    """FastV's theoretical prefill FLOPs at each family's prompt (LLaVA-1.5's 632 tokens, 576 image;
    Video-LLaVA's 2,112, 2,056 video; LLaVA-NeXT's 2,984, 2,928 image; Qwen-VL's 314, 256 image): the share of
    the prefill that pruning saves grows with the visual tokens' share of the prompt. At 13B, K=2 R=0.5's cut beside
    the paper's."""
    cells = []
    for family in FAMILIES:
        if family in ONLY_7B and size != "7b":
            continue
        config = bench_config(layers, None, family, size)
        n, visual = prompt_tokens(family, size), visual_tokens(config)
        flops = {name: theoretical_flops(config.text, n, visual, SETTINGS[name]) for name in settings_of(family)[1:]}
        ratios = ", ".join(f"{name} {pruned / unpruned:.1%}" for name, (pruned, unpruned) in flops.items())
        cells.append(f"{n} tokens ({visual} visual): {ratios}")
    line = f"theoretical prefill FLOPs of FastV at {size.upper()}, relative to off: " + "; ".join(cells)
    if size == "13b":
        text, n = bench_config(layers, None, "llava", size).text, prompt_tokens("llava", size)
        cut = {}
        for m in (n, 616):
            pruned, unpruned = theoretical_flops(text, m, 576, SETTINGS["K=2 R=0.5"])
            cut[m] = 1 - pruned / unpruned
        line += (f"\nFastV K=2 R=0.5 cuts LLaVA-1.5-13B's prefill FLOPs ({layers} layers) by {cut[n]:.1%} at this "
                 f"{n}-token prompt, {cut[616]:.1%} at 616 tokens (the paper: {PAPER_FLOPS_CUT_13B:.0%})")
    return line


def answer_s(first_token_s: float, tokens_per_s: float) -> float:
    """The time to a short answer: the first token, then ANSWER_TOKENS more at the measured decode speed."""
    return first_token_s + ANSWER_TOKENS / tokens_per_s


def report(args, results: dict, reference: dict, peer: dict | None):
    layers, ref_layers = args.layers, args.ref_layers
    family, size = getattr(args, "family", "llava"), getattr(args, "size", "7b")
    n, config = prompt_tokens(family, size), bench_config(1, None, family, size)
    visual = f"{visual_tokens(config)} {'video' if family == 'video-llava' else 'image'}"
    print(f"\n{shape_name(family, size)} shape, {layers} decoder layers, random weights; prompt {n} tokens ({visual}), "
          f"{args.decode_tokens} new tokens; medians of {args.repeats} runs after a first one")
    print("| linears | float dtype | FastV | image tokens kept | load s | first TTFT s | TTFT s (spread) | "
          f"TTFT vs off | decode tok/s | answer s (TTFT + {ANSWER_TOKENS} tokens) | attention share of the prefill | "
          "peak RSS GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for label, r in results.items():
        off = r["settings"]["off"]["ttft_s"]
        for name, s in r["settings"].items():
            prefill = s["ttft_s"] - r["vision_s"]
            print(f"| {label} | {r['dtype']} | {name} | {s['kept']} | {r['load_s']:.1f} | {s['first_ttft_s']:.1f} | "
                  f"{s['ttft_s']:.1f} ({s['ttft_spread_s']:.1f}) | {off / s['ttft_s']:.2f}x | "
                  f"{s['decode_tok_s']:.2f} | {answer_s(s['ttft_s'], s['decode_tok_s']):.1f} | "
                  f"{s['attention_s'] / prefill:.0%} | {r['peak_rss'] / GiB:.2f} |")
    for ref in reference.values():
        scale = lambda t: ref["vision_s"] + (t - ref["vision_s"]) * layers / ref_layers  # noqa: E731,B023
        for name, s in ref["settings"].items():
            decode = s["decode_tok_s"] * ref_layers / layers  # decode time grows with the layers
            print(f"| float, {ref_layers} layers scaled to {layers} | {ref['dtype']} | {name} | {s['kept']} | - | - | "
                  f"{scale(s['ttft_s']):.1f} | - | {decode:.2f} | {answer_s(scale(s['ttft_s']), decode):.1f} | "
                  f"{s['attention_s'] / (s['ttft_s'] - ref['vision_s']):.0%} | - |")
    for label, r in results.items():
        print(f"{label}: {r['kernels']}")   # which matmuls ran, and whether probed
    first = next(iter(reference.values()), None) or next(iter(results.values()))
    print(f"vision tower ({TOWERS[family]}) alone: {first['vision_s']:.2f} s in {first['dtype']}")
    print(pruning_share(layers, size))
    for label, r in results.items():
        off = r["settings"]["off"]["ttft_s"]
        saved = ", ".join(f"{name} {1 - s['ttft_s'] / off:.0%}" for name, s in r["settings"].items() if name != "off")
        print(f"measured TTFT saved at {n} tokens, {label}: {saved}")
    if peer:
        print(f"\nllama.cpp {peer['build']} (llama-bench, same machine and threads, decoder only, no vision tower)")
        print(f"| llama.cpp | prompt {n} tokens s | decode tok/s after it | answer s (prompt + {ANSWER_TOKENS} "
              "tokens) | peak RSS GiB |\n|---|---|---|---|---|")
        for name, p in peer["runs"].items():
            print(f"| {name} | {n / p['pp_tok_s']:.1f} | {p['tg_tok_s']:.2f} | "
                  f"{answer_s(n / p['pp_tok_s'], p['tg_tok_s']):.1f} | {p['peak_rss'] / GiB:.2f} |")
        for label, r in results.items():
            peer_name = PEER_OF[label.split()[0]]
            if peer_name in peer["runs"]:
                p = peer["runs"][peer_name]
                cells = ", ".join(f"{name} {s['ttft_s'] * p['pp_tok_s'] / n:.2f}x" for name, s in r["settings"].items())
                decode = ", ".join(f"{s['decode_tok_s'] / p['tg_tok_s']:.2f}x" for s in r["settings"].values())
                theirs = answer_s(n / p["pp_tok_s"], p["tg_tok_s"])
                answer = ", ".join(f"{answer_s(s['ttft_s'], s['decode_tok_s']) / theirs:.2f}x"
                                   for s in r["settings"].values())
                print(f"minifastv {label} / llama.cpp {peer_name}: TTFT / prompt time {cells}; decode speed {decode}; "
                      f"answer time (first token + {ANSWER_TOKENS} tokens; llama.cpp without a vision tower) {answer}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m minifastv bench --quant", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quant", nargs="+", choices=list(METHODS), default=["int8", "int4"])
    p.add_argument("--family", choices=list(FAMILIES), default="llava",
                   help="llava: LLaVA-1.5, one image (632 tokens); video-llava: Video-LLaVA-7B, one 8-frame video "
                        "(2,112 tokens); llava-next: LLaVA-NeXT, one 672 x 672 image (2,984 tokens); qwen-vl: "
                        "Qwen-VL-Chat-7B, one image (314 tokens)")
    p.add_argument("--size", choices=list(SIZES), default="7b",
                   help="the decoder: 7b (32 layers, 4096 wide) or 13b (40 layers, 5120 wide)")
    p.add_argument("--layers", type=int, help="decoder layers (default: the model's, 32 for 7B, 40 for 13B)")
    p.add_argument("--ref-layers", type=int, default=4,
                   help="decoder layers of the float reference (0: no float reference)")
    p.add_argument("--workdir", default="/tmp/minifastv-bench", help="where the generated checkpoints are kept")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=physical_cores())
    p.add_argument("--peer", choices=["llama.cpp"], help="time llama.cpp on the same shapes in the same run")
    p.add_argument("--peer-bin", help="directory holding llama-bench and llama-quantize (default: PATH)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS), metavar="SETTING",
                   help="the FastV settings measured, off always among them (default: the family's: off, 'K=2 "
                        "R=0.5', 'K=2 R=0.75', and for llava-next 'K=2 320 kept')")
    p.add_argument("--dtype", default="auto", help="float weights' dtype (default: auto, as minifastv.load picks)")
    p.add_argument("--activations", nargs="+", choices=["float", "int8"], default=["float"],
                   help="the int8 checkpoint measured with each: float (weight-only) and/or int8 activations "
                        "(int4 stays weight-only)")
    p.add_argument("--kv-cache", nargs="+", choices=["float", "int8"], default=["float"],
                   help="each checkpoint measured with each: a float (fp32 on a CPU) and/or an int8 KV cache")
    args = p.parse_args(argv)
    for flag, value, least in (("--repeats", args.repeats, 1), ("--decode-tokens", args.decode_tokens, 2),
                               ("--threads", args.threads, 1), ("--layers", 1 if args.layers is None else args.layers, 1),
                               ("--ref-layers", args.ref_layers, 0)):
        if value < least:  # decode speed is timed between the first and the last new token: two at least
            raise ValueError(f"{flag} must be at least {least}, got {value}")
    if "int8" in args.activations and "int8" in args.quant and not int8_gemm_exact():
        raise ValueError("--activations int8: not available on this CPU (its integer GEMM saturates on full-range "
                         "int8 weights; see minifastv/int8act.py); measure with --activations float")
    # the model's depth; bench_config also refuses a size the family does not have, before anything is built
    args.layers = args.layers or bench_config(None, None, args.family, args.size).text.n_layers
    family_settings = settings_of(args.family)
    if args.child is None:   # off first (the other settings are reported relative to it), then the family's order
        wanted = set(args.settings or family_settings) | {"off"}
        if wanted - set(family_settings):
            raise ValueError(f"--settings {', '.join(sorted(wanted - set(family_settings)))}: not a setting of "
                             f"--family {args.family} (its settings: {', '.join(family_settings)})")
        args.settings = [name for name in family_settings if name in wanted]
    if args.child:
        print(json.dumps(measure(Path(args.child), args.settings, args.repeats, args.decode_tokens, args.threads,
                                 args.dtype, args.activations[0], args.kv_cache[0])))
        return 0
    if args.peer:   # before minutes of measuring: a missing llama-bench or llama-quantize is said now
        for tool in ("llama-bench", "llama-quantize"):
            find_tool(tool, args.peer_bin)
    start = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - start:7.1f} s] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    print(describe(args.threads))
    print(f"command: python -m minifastv bench {shlex.join(sys.argv[1:] if argv is None else argv)}")
    results = {}
    settings = args.settings
    for method in args.quant:
        path = build_checkpoint(Path(args.workdir) / checkpoint_name(args.family, args.size, method, args.layers),
                                bench_config(args.layers, METHODS[method], args.family, args.size), log)
        log(f"{method}: measuring {', '.join(settings)} ({args.repeats} runs after a first one, {args.decode_tokens} "
            f"new tokens) in a child process per activation type and KV cache")
        if method == "int4":
            pack_for_this_cpu(path, log)
        for activations, kv_cache in itertools.product(args.activations if method == "int8" else ["float"],
                                                       args.kv_cache):
            label = (method + (" + int8 activations" if activations == "int8" else "")
                     + (" + int8 KV cache" if kv_cache == "int8" else ""))
            results[label] = measure_in_child(path, settings, args, args.dtype, activations, kv_cache)
            log(f"{label}: {json.dumps(results[label])}")
    reference = {}
    if args.ref_layers:
        log(f"float reference: {args.ref_layers} decoder layers")
        reference = float_reference(args, log)
        log(f"float reference: {json.dumps(reference)}")
    try:
        peer = peer_llama_cpp(args, log) if args.peer else None
    except PeerError as e:   # minifastv's figures are printed all the same
        report(args, results, reference, None)
        print(f"error: --peer llama.cpp: {e}", file=sys.stderr)
        return 1
    report(args, results, reference, peer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
