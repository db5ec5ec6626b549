"""How a decode step's one-row matmuls use the threads and the memory (docs/cpu.md, "Where a decode step goes").

1. Per-thread scaling: the seven linears of --layers LLaMA-7B layers (int8, enough bytes that each weight comes back
   cold from memory), one row, through torch's weight-only kernel and through the integer GEMM of int8 activations,
   on 1 thread and on --threads; then each weight split in two halves of its output features, one half computed
   in a second Python thread (torch releases the GIL) and one in the caller, each op on 1 thread: whether
   splitting the output features by hand beats torch's own use of the threads.
2. With --checkpoint (an int8 minifastv checkpoint): all its decoder layers' linears at one row with the weights
   as `load` maps them from the file, against the same tensors cloned into anonymous memory.

    python benchmarks/one_row.py [--layers 8] [--threads 2] [--repeats 7] [--rounds 2] [--checkpoint DIR]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minifastv.bench.machine import describe
from minifastv.bench.timing import repeat
from minifastv.config import QuantConfig
from minifastv.machine import physical_cores
from minifastv.quant.linear import quantize_weight

SHAPES = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]   # q, k, v, o, gate, up, down: (out, in)


def weight_only(x, weight, scale):
    return torch._weight_int8pack_mm(x, weight, scale)


def integer(x, weight, scale):
    return torch._int_mm(x, weight.t())


def run_all(kernel, weights, inputs):
    for weight, scale in weights:
        kernel(inputs[weight.shape[1]], weight, scale)


def run_split(kernel, halves, inputs, pool):
    for first, second in halves:
        other = pool.submit(kernel, inputs[first[0].shape[1]], *first)
        kernel(inputs[second[0].shape[1]], *second)
        other.result()


def line(what: str, runs, nbytes: int) -> str:
    return (f"{what}: {runs.median * 1e3:.1f} ms ({runs.low * 1e3:.1f}-{runs.high * 1e3:.1f}), "
            f"{nbytes / runs.median / 1e9:.1f} GB/s")


def scaling(args):
    g = torch.Generator().manual_seed(0)
    weights = []
    for _ in range(args.layers):
        for n, k in SHAPES:
            q = quantize_weight(torch.randn(n, k, generator=g), QuantConfig("int8"))
            weights.append((q["weight"], q["scale"]))
    halves = [((w[:len(w) // 2].contiguous(), s[:len(w) // 2].contiguous()),
               (w[len(w) // 2:].contiguous(), s[len(w) // 2:].contiguous())) for w, s in weights]
    nbytes = sum(w.nbytes for w, _ in weights)
    inputs = {"weight-only kernel": (weight_only, {k: torch.randn(1, k).bfloat16() for k in (4096, 11008)}),
              "integer GEMM": (integer, {k: torch.randint(-127, 128, (1, k), dtype=torch.int8) for k in (4096, 11008)})}
    pool = concurrent.futures.ThreadPoolExecutor(1)
    print(f"{args.layers} layers' linears, {nbytes / 2**30:.2f} GiB of int8 weights, one row")
    for _ in range(args.rounds):
        for name, (kernel, x) in inputs.items():
            for threads in (1, args.threads):
                torch.set_num_threads(threads)
                print(line(f"{name}, {threads} thread(s)", repeat(lambda k=kernel, x=x: run_all(k, weights, x),
                                                                 args.repeats), nbytes), flush=True)
            torch.set_num_threads(1)
            print(line(f"{name}, split in halves over 2 Python threads of 1", repeat(
                lambda k=kernel, x=x: run_split(k, halves, x, pool), args.repeats), nbytes), flush=True)
    torch.set_num_threads(args.threads)


def mapped_or_copied(args):
    from minifastv import load
    from minifastv.quant import Int8Linear, quantized_modules

    model = load(args.checkpoint)
    mapped = [(m.weight, m.scale) for name, m in quantized_modules(model)
              if isinstance(m, Int8Linear) and name != "llm.lm_head"]
    if not mapped:
        raise SystemExit(f"{args.checkpoint}: not an int8 checkpoint")
    copied = [(w.clone(), s.clone()) for w, s in mapped]
    x = {k: torch.randn(1, k).bfloat16() for k in {w.shape[1] for w, _ in mapped}}
    nbytes = sum(w.nbytes for w, _ in mapped)
    print(f"{args.checkpoint}: {len(mapped)} linears, {nbytes / 2**30:.2f} GiB, one row, {args.threads} threads")
    for _ in range(args.rounds + 1):
        for name, weights in (("mapped from the file", mapped), ("cloned into anonymous memory", copied)):
            print(line(name, repeat(lambda w=weights: run_all(weight_only, w, x), args.repeats), nbytes), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--threads", type=int, default=physical_cores())
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--checkpoint", help="an int8 minifastv checkpoint: mapped against cloned weights")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(describe(args.threads))
    with torch.inference_mode():
        scaling(args)
        if args.checkpoint:
            mapped_or_copied(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
