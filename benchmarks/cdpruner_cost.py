"""What CDPruner's selection costs at the real shapes, beside the prefill it saves, in the same run.

    python benchmarks/cdpruner_cost.py [--repeats 3] [--dtype bfloat16] [--threads 2]

For LLaVA-1.5-7B (576 image tokens in a 632-token prompt; budgets 64, 128, 192) and LLaVA-NeXT-7B (2,880 in a
2,936-token prompt; budget 320), random weights:
- relevance: the instruction through CLIP ViT-L/14's text tower (12 layers, 768 wide, one 77-token chunk) and the
  patches' CLIP embeddings (post_layernorm and visual_projection, 1,024 -> 768), as models/clip_text.py runs them;
- selection: CDPruner.select on the 4,096-wide projected features (cosine similarity, kernel, greedy DPP);
- the saving: one LLaVA-1.5-7B decoder layer (4,096 wide, MLP 11,008) on the whole prompt and on the pruned one;
  CDPruner prunes before the decoder, so all 32 layers run on the pruned prompt: 32 x the per-layer difference.
Medians of --repeats after a warm-up, with their spread; the machine is printed first.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minifastv.bench.machine import describe
from minifastv.bench.timing import repeat
from minifastv.config import LlavaConfig, TextConfig
from minifastv.config_clip import ClipTextConfig
from minifastv.models.clip_text import ClipText
from minifastv.models.llama import Llama
from minifastv.pruning import CDPruner

SHAPES = {"LLaVA-1.5-7B": (632, 576, 576, (64, 128, 192)), "LLaVA-NeXT-7B": (2936, 2880, None, (320,))}


def fmt(t) -> str:
    return f"{t[0] * 1e3:.1f} ms ({t[1] * 1e3:.1f}-{t[2] * 1e3:.1f})"


@torch.inference_mode()
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    print(describe(args.threads) + f"; {args.dtype}")
    clip = ClipText(LlavaConfig(clip_text=ClipTextConfig())).to(dtype)
    decoder = Llama(TextConfig(n_layers=1)).to(dtype)
    chunk = torch.randint(0, 49406, (1, 77))
    text = repeat(lambda: clip.encode_text(chunk), args.repeats)
    print(f"instruction through CLIP's text tower (one 77-token chunk): {fmt(text)}")
    print("| model | image tokens | kept | relevance (text + patches) ms | selection ms | 32 layers unpruned - "
          "pruned ms (the saving) | selection + relevance / saving |\n|---|---|---|---|---|---|---|")
    for name, (n_prompt, n_image, per_image, budgets) in SHAPES.items():
        features = torch.randn(1, n_image, 1024, dtype=dtype)
        direction = torch.nn.functional.normalize(torch.randn(1, 768), dim=-1)
        patches = repeat(lambda f=features, d=direction: clip.relevance(f, d), args.repeats)
        relevance = clip.relevance(features, direction).float()
        hidden = torch.randn(1, n_prompt, 4096, dtype=dtype)
        image = torch.zeros(1, n_prompt, dtype=torch.bool)
        image[0, 35:35 + n_image] = True
        scores = torch.zeros(1, n_prompt)
        scores[image] = relevance[0]

        def layer(n):
            x = torch.randn(1, n, 4096, dtype=dtype)
            positions = torch.arange(n)[None]
            return lambda: decoder(decoder.sequence(x, positions, torch.ones(1, n, dtype=torch.bool)))

        full = repeat(layer(n_prompt), args.repeats)
        for k in budgets:
            ctx = SimpleNamespace(image_mask=image, hidden=hidden, vision_scores=scores, n_keep=torch.tensor([k]),
                                  n_patches=per_image)
            method = CDPruner(ratio=1 - k / n_image)
            select = repeat(lambda m=method, c=ctx: m.select(c), args.repeats)
            pruned = repeat(layer(n_prompt - n_image + k), args.repeats)
            saving = 32 * (full[0] - pruned[0])
            overhead = text[0] + patches[0] + select[0]
            print(f"| {name} | {n_image} | {k} | {(text[0] + patches[0]) * 1e3:.1f} | {fmt(select)} | "
                  f"{saving * 1e3:.0f} | {overhead / saving:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
