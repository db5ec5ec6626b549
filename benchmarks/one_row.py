"""How a decode step's one-row matmuls use the threads and the memory (docs/cpu.md, "Where a decode step goes").

1. Per-thread scaling: the seven linears of --layers LLaMA-7B layers (enough bytes that each weight comes back cold
   from memory), one row, through torch's weight-only int8 kernel, the integer GEMM of int8 activations and
   torch's weight-only int4 kernel (groups of 128, the CPU layout `load` repacks to), on 1 thread and on
   --threads; then each weight split in two halves of its output features, one half computed in a second Python
   thread (torch releases the GIL) and one in the caller, each op on 1 thread: whether splitting the output
   features by hand beats torch's own use of the threads.
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
from minifastv.quant.linear import quantize_weight, quantized_linear

SHAPES = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]   # q, k, v, o, gate, up, down: (out, in)
INT4 = QuantConfig("int4", 128)


def weight_only(x, weight, scale):
    return torch._weight_int8pack_mm(x, weight, scale)


def integer(x, weight, scale):
    return torch._int_mm(x, weight.t())


def int4_weight_only(x, packed, table):
    return torch._weight_int4pack_mm_for_cpu(x, packed, INT4.group_size, table)


def int4_packed(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w in int4, in the layout of torch's CPU kernel: (packed [out, in/2], scale-and-offset table [in/G, out, 2])."""
    linear = quantized_linear(w, INT4)
    if linear.packed_for_cpu is None:
        raise SystemExit("torch's CPU int4 layout is not the one minifastv knows here: no int4 kernel to time")
    return linear.packed_for_cpu


def halves(weights, int4: bool):
    """Each (weight, scale) split in two by output features: rows of the weight, and of the scale (int8) or the
    second dimension of the scale-and-offset table (int4; both halves whole blocks of the CPU layout)."""
    def cut(w, s, part):
        n = len(w) // 2
        rows = slice(0, n) if part == 0 else slice(n, None)
        return w[rows].contiguous(), (s[:, rows] if int4 else s[rows]).contiguous()
    return [(cut(w, s, 0), cut(w, s, 1)) for w, s in weights]


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
    int8, int4 = [], []
    for _ in range(args.layers):
        for n, k in SHAPES:
            w = torch.randn(n, k, generator=g)
            int8.append(tuple(quantize_weight(w, QuantConfig("int8")).values()))
            int4.append(int4_packed(w))
    bf16 = {k: torch.randn(1, k).bfloat16() for k in (4096, 11008)}
    kernels = {"int8 weight-only kernel": (weight_only, int8, bf16),
               "int8 integer GEMM": (integer, int8, {k: torch.randint(-127, 128, (1, k), dtype=torch.int8)
                                                     for k in (4096, 11008)}),
               # inputs are looked up by the weight's second dimension: half the width in the packed int4 layout
               "int4 weight-only kernel": (int4_weight_only, int4, {k // 2: x for k, x in bf16.items()})}
    pool = concurrent.futures.ThreadPoolExecutor(1)
    print(f"{args.layers} layers' linears, one row: {sum(w.nbytes for w, _ in int8) / 2**30:.2f} GiB of int8 "
          f"weights, {sum(w.nbytes + s.nbytes for w, s in int4) / 2**30:.2f} GiB of int4 weights with their tables")
    for _ in range(args.rounds):
        for name, (kernel, weights, x) in kernels.items():
            with_tables = kernel is int4_weight_only   # int4's scale-and-offset tables count among its bytes
            nbytes = sum(w.nbytes + (s.nbytes if with_tables else 0) for w, s in weights)
            split = halves(weights, int4=with_tables)
            for threads in (1, args.threads):
                torch.set_num_threads(threads)
                print(line(f"{name}, {threads} thread(s)", repeat(lambda k=kernel, w=weights, x=x: run_all(k, w, x),
                                                                 args.repeats), nbytes), flush=True)
            torch.set_num_threads(1)
            print(line(f"{name}, split in halves over 2 Python threads of 1", repeat(
                lambda k=kernel, h=split, x=x: run_split(k, h, x, pool), args.repeats), nbytes), flush=True)
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
