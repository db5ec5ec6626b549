"""Held-out accuracy of the tiny model with FastV off, for a (K, R) grid, and for random dropping at the
same budgets; prints a markdown table and writes a PNG of accuracy against relative prefill FLOPs.

    python evaluate_tiny.py [--model minifastv/data/tiny] [--n 400] [--plot docs/fastv_tiny.png] [--dtype float32]

It also prints the accuracy with the decoder's linears quantized to int8 and int4 (minifastv/quant.py).
"""

from __future__ import annotations

import argparse
import copy
import sys

from minifastv import FastV, RandomDrop
from minifastv.config import QuantConfig
from minifastv.data import TINY_MODEL
from minifastv.pipeline import Pipeline
from minifastv.quant import quantize_model
from minifastv.plot import line_plot
from shapes import QUESTION_TYPES, evaluate, majority_baseline

GRID_K, GRID_R = (1, 2), (0.25, 0.5, 0.75)
RANDOM_SEEDS = (0, 1, 2)
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(TINY_MODEL))
    p.add_argument("--n", type=int, default=400, help="held-out examples")
    p.add_argument("--plot", default="docs/fastv_tiny.png")
    p.add_argument("--dtype", default="float32", help="float dtype (default float32, which the tables were made "
                                                      "with; auto picks bf16 on CPUs with native bf16)")
    args = p.parse_args(argv)
    pipe = Pipeline.load(args.model, dtype=args.dtype)
    model = pipe.model
    base = evaluate(pipe, args.n)
    blind = evaluate(pipe, args.n, blank_images=True)
    majority = majority_baseline(args.n)
    int8 = evaluate(Pipeline(quantize_model(copy.deepcopy(model), QuantConfig("int8")), pipe.tokenizer), args.n)
    int4 = evaluate(Pipeline(quantize_model(copy.deepcopy(model), QuantConfig("int4", INT4_GROUP)), pipe.tokenizer),
                    args.n)
    print(f"held-out accuracy, {args.n} examples, FastV off")
    print("| | " + " | ".join(QUESTION_TYPES) + " | all |\n|---|" + "---|" * (len(QUESTION_TYPES) + 1))
    for name, acc in (("model", base), ("model, blank image", blind), ("majority answer", majority),
                      ("model, int8 weights", int8), (f"model, int4 weights (groups of {INT4_GROUP})", int4)):
        print(f"| {name} | " + " | ".join(f"{acc[k]:.1%}" for k in (*QUESTION_TYPES, "all")) + " |")

    rows = [{"method": "full", "k": "-", "r": 0.0, "flops": 1.0, "acc": base["all"]}]
    for k in GRID_K:
        for r in GRID_R:
            fast = evaluate(pipe, args.n, prune=FastV(k, r))
            rows.append({"method": f"FastV K={k}", "k": k, "r": r, "flops": fast["flops"], "acc": fast["all"]})
            # A seed keeps the same positions in every image with as many tokens: average over seeds.
            draws = [evaluate(pipe, args.n, prune=RandomDrop(k, r, seed=s))["all"] for s in RANDOM_SEEDS]
            rows.append({"method": f"random K={k}", "k": k, "r": r, "flops": fast["flops"],
                         "acc": sum(draws) / len(draws), "range": (min(draws), max(draws))})
    print(f"\nFastV grid, {args.n} held-out examples; random drop: mean (range) over seeds {RANDOM_SEEDS}")
    print("| K | R | relative FLOPs | FastV accuracy | random-drop accuracy |\n|---|---|---|---|---|")
    print(f"| - | 0 | 100.0% | {base['all']:.1%} | {base['all']:.1%} |")
    for k in GRID_K:
        for r in GRID_R:
            fast, rand = (next(x for x in rows if x["method"] == f"{m} K={k}" and x["r"] == r)
                          for m in ("FastV", "random"))
            lo, hi = rand["range"]
            print(f"| {k} | {r} | {fast['flops']:.1%} | {fast['acc']:.1%} | {rand['acc']:.1%} ({lo:.1%}-{hi:.1%}) |")
    plot(rows, args.plot)
    print(f"\nwrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
