"""Held-out accuracy of the tiny model: unpruned; FastV on a (K, R) grid against random dropping; every
pruning method at kept budgets of 50%, 25% and 12.5% of the image tokens; prints markdown tables and writes
PNGs of accuracy against relative prefill FLOPs (--plot for FastV's grid, --methods-plot for the methods).
With --video, the same for the tiny video model on the video task (video_shapes.py), FastV at K=2 and K=5,
R=50%, as the paper's Table 6 runs Video-LLaVA. With --anyres, the tiny LLaVA-NeXT on anyres_shapes.py, with a row
for the base image alone (every tile blank) and FastV under each treatment of the packed tokens (--anyres). With
--qwen, the tiny Qwen-VL on the shapes task (its tokens are the resampler's queries, not patches).

    python evaluate_tiny.py [--video | --anyres | --qwen] [--model minifastv/data/tiny] [--n 400]
                            [--plot results/fastv_tiny.png] [--methods-plot results/pruning_tiny.png] [--dtype float32]

It also prints the accuracy with the decoder's linears quantized to int8 and int4 (minifastv/quant.py), and
where FastV's attention ranking puts its kept tokens (the measurement behind the README's explanation).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

from minifastv import FastV, RandomDrop
from minifastv.config import QuantConfig
import anyres_shapes
import shapes
import video_shapes
from minifastv.data import TINY_MODEL, TINY_NEXT_MODEL, TINY_QWEN_MODEL, TINY_VIDEO_MODEL
from minifastv.pipeline import Pipeline
from minifastv.plot import line_plot
from minifastv.pruning import METHODS, AfterLayer, AnyresParts, at_budget
from minifastv.pruning.anyres_parts import TREATMENTS
from minifastv.quant.linear import quantize_model
from shapes import make_batch

GRID_K, GRID_R = (1, 2), (0.25, 0.5, 0.75)
VIDEO_GRID_K, VIDEO_GRID_R = (2, 5), (0.5,)   # the paper's Table 6: Video-LLaVA at K=2 and K=5, R=50%
NO_VIDEO = ("fastervlm", "visionzip")         # they rank by the vision tower's class-token attention
NO_CLASS_TOKEN = NO_VIDEO                     # Qwen-VL's tower has no class token either
NO_ANYRES = (*NO_VIDEO, "uniform", "pool")    # LLaVA-NeXT's tiles do not take them yet (nor the per-image ones)
RANDOM_SEEDS = (0, 1, 2)
BUDGETS = (0.5, 0.25, 0.125)  # fractions of the image tokens kept
K = 2
INT4_GROUP = 32  # the tiny decoder's MLP is 352 wide: 32 is the largest kernel group size that divides it


def plot(rows, path: str):
    series = {}
    for r in rows:
        series.setdefault(r["method"], []).append((r["flops"], r["acc"]))
    for name in list(series):  # every curve starts at the unpruned model
        if name != "full":
            series[name].append((1.0, next(r["acc"] for r in rows if r["method"] == "full")))
    lo = min(0.5, min(r["acc"] for r in rows) - 0.05)
    line_plot(series, path, xlabel="relative prefill FLOPs", ylabel="held-out accuracy", xlim=(0.3, 1.0),
              ylim=(lo, 1.0), percent_y=True)


def compare_methods(pipe, n: int, task=shapes) -> list[dict]:
    rows = []
    for name in methods_for(task, pipe):
        for kept in BUDGETS:
            seeds = RANDOM_SEEDS if name == "random" else (0,)
            k = K if issubclass(METHODS[name], AfterLayer) else None
            runs = [task.evaluate(pipe, n, prune=at_budget(name, kept, k, seed if name == "random" else None))
                    for seed in seeds]
            rows.append({"method": name, "budget": kept, "acc": sum(r["all"] for r in runs) / len(runs),
                         "flops": runs[0]["flops"], "kept": runs[0]["kept"]})
    return rows


NO_TEXT_TOWER = ("cdpruner",)                 # it ranks by CLIP's text tower, which only the tiny LLaVA carries


def methods_for(task, pipe) -> list[str]:
    skip = {shapes: (), video_shapes: NO_VIDEO, anyres_shapes: NO_ANYRES}[task]
    if pipe.model.config.family == "qwen-vl":
        skip = (*skip, *NO_CLASS_TOKEN)
    if pipe.model.clip_text is None:
        skip = (*skip, *NO_TEXT_TOWER)
    return [name for name in METHODS if name not in skip]


def anyres_treatments(pipe, n: int, kept: float = 0.25) -> list[tuple[str, dict]]:
    """FastV at K=2 keeping `kept` of the image tokens, on the packed tokens as one set and under each named
    treatment (pruning/anyres_parts.py); and the same for random dropping, mean over RANDOM_SEEDS."""
    rows = []
    for name, method in (("fastv", lambda s: at_budget("fastv", kept, K)),
                         ("random", lambda s: at_budget("random", kept, K, s))):
        for treatment in ("one set", *TREATMENTS):
            runs = [anyres_shapes.evaluate(pipe, n, prune=method(s) if treatment == "one set"
                                           else AnyresParts(method(s), **TREATMENTS[treatment]))
                    for s in (RANDOM_SEEDS if name == "random" else (0,))]
            rows.append((f"{name}, {treatment}", {key: sum(r[key] for r in runs) / len(runs) for key in runs[0]}))
    return rows


@torch.inference_mode()
def fastv_position_bias(pipe, n: int, kept: float = 0.25) -> tuple[float, float, float]:
    """Over n held-out prompts: the Spearman correlation between the layer K-1 attention score of an image
    token (FastV's ranking) and its index in the row-major patch grid, the mean grid row of the tokens FastV
    keeps at `kept` (an unbiased choice averages the middle row), and the share of the image tokens'
    attention that the kept ones take."""
    batch, _ = make_batch(pipe, "heldout", range(n))
    pre = pipe.model.prefill(**batch.model_inputs(), attention_rows=1)
    side = pipe.model.config.vision.grid
    rhos, rows, shares = [], [], []
    for row, image in zip(pre.attention[K - 1][:, -1], pre.image_mask):
        scores = row[image].float()                                            # patch order
        rank = scores.argsort().argsort().float()
        index = torch.arange(len(scores), dtype=torch.float)
        rhos.append(float(torch.corrcoef(torch.stack([rank, index]))[0, 1]))
        top = scores.topk(round(kept * len(scores))).indices
        rows.append(float((top // side).float().mean()))
        shares.append(float(scores[top].sum() / scores.sum()))
    return sum(rhos) / n, sum(rows) / n, sum(shares) / n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--video", action="store_true", help="the tiny video model on the video task")
    which.add_argument("--anyres", action="store_true", help="the tiny LLaVA-NeXT on anyres_shapes.py")
    which.add_argument("--qwen", action="store_true", help="the tiny Qwen-VL on the shapes task")
    p.add_argument("--model", help="checkpoint (default: the shipped tiny model, tiny video model with --video, "
                   "tiny LLaVA-NeXT with --anyres, tiny Qwen-VL with --qwen)")
    p.add_argument("--n", type=int, default=400, help="held-out examples")
    p.add_argument("--plot", default="results/fastv_tiny.png", help="FastV's grid (default: %(default)s; the "
                   "README's pictures are made with --plot docs/fastv_tiny.png --methods-plot docs/pruning_tiny.png)")
    p.add_argument("--methods-plot", default="results/pruning_tiny.png", help="every method (default: %(default)s)")
    p.add_argument("--dtype", default="float32", help="float dtype (default float32, which the tables were made "
                                                      "with; auto picks bf16 on CPUs with native bf16)")
    args = p.parse_args(argv)
    for picture in (args.plot, args.methods_plot):
        Path(picture).parent.mkdir(parents=True, exist_ok=True)
    task = video_shapes if args.video else anyres_shapes if args.anyres else shapes
    grid_k, grid_r = (VIDEO_GRID_K, VIDEO_GRID_R) if args.video else (GRID_K, GRID_R)
    default = TINY_VIDEO_MODEL if args.video else TINY_NEXT_MODEL if args.anyres else \
        TINY_QWEN_MODEL if args.qwen else TINY_MODEL
    pipe = Pipeline.load(args.model or default, dtype=args.dtype)
    model, evaluate, kinds = pipe.model, task.evaluate, task.QUESTION_TYPES
    base = evaluate(pipe, args.n)
    blind = evaluate(pipe, args.n, blank_images=True)
    majority = task.majority_baseline(args.n)
    int8 = evaluate(Pipeline(quantize_model(copy.deepcopy(model), QuantConfig("int8")), pipe.tokenizer), args.n)
    int4 = evaluate(Pipeline(quantize_model(copy.deepcopy(model), QuantConfig("int4", INT4_GROUP)), pipe.tokenizer),
                    args.n)
    blank = "blank video" if args.video else "blank image"
    base_only = [("model, base image only (tiles blank)", evaluate(pipe, args.n, blank_tiles=True))] \
        if args.anyres else []
    print(f"held-out accuracy, {args.n} examples, FastV off")
    print("| | " + " | ".join(kinds) + " | all |\n|---|" + "---|" * (len(kinds) + 1))
    for name, acc in (("model", base), (f"model, {blank}", blind), *base_only, ("majority answer", majority),
                      ("model, int8 weights", int8), (f"model, int4 weights (groups of {INT4_GROUP})", int4)):
        print(f"| {name} | " + " | ".join(f"{acc[k]:.1%}" for k in (*kinds, "all")) + " |")

    rows = [{"method": "full", "k": "-", "r": 0.0, "flops": 1.0, "acc": base["all"]}]
    for k in grid_k:
        for r in grid_r:
            fast = evaluate(pipe, args.n, prune=FastV(k, r))
            rows.append({"method": f"FastV K={k}", "k": k, "r": r, "flops": fast["flops"], "acc": fast["all"]})
            # A seed keeps the same positions in every image with as many tokens: average over seeds.
            draws = [evaluate(pipe, args.n, prune=RandomDrop(k, r, seed=s))["all"] for s in RANDOM_SEEDS]
            rows.append({"method": f"random K={k}", "k": k, "r": r, "flops": fast["flops"],
                         "acc": sum(draws) / len(draws), "range": (min(draws), max(draws))})
    print(f"\nFastV grid, {args.n} held-out examples; random drop: mean (range) over seeds {RANDOM_SEEDS}")
    print("| K | R | relative FLOPs | FastV accuracy | random-drop accuracy |\n|---|---|---|---|---|")
    print(f"| - | 0 | 100.0% | {base['all']:.1%} | {base['all']:.1%} |")
    for k in grid_k:
        for r in grid_r:
            fast, rand = (next(x for x in rows if x["method"] == f"{m} K={k}" and x["r"] == r)
                          for m in ("FastV", "random"))
            lo, hi = rand["range"]
            print(f"| {k} | {r} | {fast['flops']:.1%} | {fast['acc']:.1%} | {rand['acc']:.1%} ({lo:.1%}-{hi:.1%}) |")
    plot(rows, args.plot)

    methods = compare_methods(pipe, args.n, task)
    print(f"\npruning methods, {args.n} held-out examples; accuracy (relative prefill FLOPs) at each share of "
          f"image tokens kept; K={K} where a method has a layer; random: mean over seeds {RANDOM_SEEDS}; "
          "pyramiddrop keeps the share after its last stage, the share present in an average layer is given")
    print("| method | " + " | ".join(f"{b:.1%} kept" for b in BUDGETS) + " |\n|---|" + "---|" * len(BUDGETS))
    for name in methods_for(task, pipe):
        cells = []
        for r in (x for x in methods if x["method"] == name):
            note = f", {r['kept']:.0%} on average" if name.startswith("pyramiddrop") else ""
            cells.append(f"{r['acc']:.1%} ({r['flops']:.1%}{note})")
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.video:
        print(f"({', '.join(NO_VIDEO)} take no video: they rank by the vision tower's class-token attention)")
    if args.anyres:
        print(f"({', '.join(NO_ANYRES)} take no tiles yet: {', '.join(NO_VIDEO)} rank by the vision tower's "
              "class-token attention, uniform and pool work per image of one fixed size)")
    if args.qwen:
        print(f"({', '.join(NO_CLASS_TOKEN)} do not apply: they rank by the vision tower's class-token attention, "
              "and Qwen-VL's tower has no class token)")
    if pipe.model.clip_text is None:
        print(f"({', '.join(NO_TEXT_TOWER)}: this model has no CLIP text tower, which it ranks by)")
    series = {name: [(r["flops"], r["acc"]) for r in methods if r["method"] == name] + [(1.0, base["all"])]
              for name in methods_for(task, pipe)}
    line_plot(series, args.methods_plot, xlabel="relative prefill FLOPs", ylabel="held-out accuracy",
              xlim=(0.0, 1.0), ylim=(0.0, 1.0), percent_y=True)

    if args.anyres:
        print(f"\nthe packed tokens' treatments (--anyres), {args.n} held-out examples, K={K}, 25% of the image tokens "
              f"kept; random: mean over seeds {RANDOM_SEEDS}")
        print("| method, treatment | " + " | ".join(kinds) + " | all |\n|---|" + "---|" * (len(kinds) + 1))
        for name, acc in anyres_treatments(pipe, args.n):
            print(f"| {name} | " + " | ".join(f"{acc[k]:.1%}" for k in (*kinds, "all")) + " |")
    if args.video or args.anyres or args.qwen:  # the position bias is of a patch grid; Qwen-VL's tokens are queries
        print(f"\nwrote {args.plot} and {args.methods_plot}")
        return 0
    rho, row, share = fastv_position_bias(pipe, min(args.n, 200))
    side = model.config.vision.grid
    print(f"\nFastV's ranking (layer {K - 1} attention of the last prompt token), {min(args.n, 200)} prompts: "
          f"Spearman correlation of score with patch index {rho:+.2f}; the top 25% sit on grid row {row:.2f} on "
          f"average (0..{side - 1}; an unbiased choice averages {(side - 1) / 2:.1f}) and take {share:.0%} of the "
          "image tokens' attention")
    print(f"\nwrote {args.plot} and {args.methods_plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
