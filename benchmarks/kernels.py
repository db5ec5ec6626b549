"""Which matmul each quantized linear should run, measured: the table behind minifastv/quant.py's choices.

For one LLaVA-1.5-7B decoder layer (the seven linears: q, k, v, o 4096x4096; gate, up 4096->11008; down
11008->4096) and a range of row counts (1 = a decode step, 632 = a LLaVA prompt with one image, 344 = the same
prompt after FastV drops half of the image tokens), prints the median time of each way to compute x @ W.T:

  float      F.linear with float weights in the compute dtype (what an unquantized model does)
  int8 kern  torch._weight_int8pack_mm, bf16 activations (one byte per weight read)
  int8 block minifastv's blockwise path: convert a cache-sized block of rows to the compute dtype, GEMM, scale
  int8 whole dequantize the whole weight to the compute dtype, then F.linear (the first prototype)
  int8 act   int8 activations: each row rounded to int8, torch._int_mm, both scales (--activations int8)
  int4 kern  torch._weight_int4pack_mm_for_cpu, bf16 activations, group size 128
  int4 block the blockwise path for int4, reading the kernel's packed layout (unpack nibbles, scale, offset)

    python benchmarks/kernels.py [--dtype auto|float32|bfloat16] [--rows 1 4 16 64 344 632] [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minifastv.bench.machine import describe  # noqa: E402
from minifastv.bench.timing import repeat
from minifastv.config import QuantConfig  # noqa: E402
from minifastv.machine import resolve_dtype, set_threads  # noqa: E402
from minifastv.quant.int8act import int8_activation_matmul  # noqa: E402
from minifastv.quant.linear import quantized_linear  # noqa: E402

LAYER = [("q", 4096, 4096), ("k", 4096, 4096), ("v", 4096, 4096), ("o", 4096, 4096),
         ("gate", 11008, 4096), ("up", 11008, 4096), ("down", 4096, 11008)]  # (name, out, in)


def paths(weight: torch.Tensor, dtype: torch.dtype) -> dict:
    """name -> function of x computing x @ weight.T by that path."""
    w = weight.to(dtype)
    int8 = quantized_linear(weight, QuantConfig("int8"))
    int4 = quantized_linear(weight, QuantConfig("int4", 128))
    packed, table = int4.packed_for_cpu
    return {
        "float": lambda x: F.linear(x, w),
        "int8 kern": lambda x: torch._weight_int8pack_mm(x.to(torch.bfloat16), int8.weight, int8.scale).to(dtype),
        "int8 block": int8.blockwise_matmul,
        "int8 whole": lambda x: F.linear(x, int8.dequantize(dtype)),
        "int8 act": lambda x: int8_activation_matmul(x, int8.weight, int8.scale),
        "int4 kern": lambda x: torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), packed, 128, table).to(dtype),
        "int4 block": int4.blockwise_matmul,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="auto", help="compute dtype: auto (as minifastv.load picks), float32, bfloat16")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64, 344, 632])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="default: the physical cores")
    p.add_argument("--skip", nargs="*", default=[], help="paths to leave out (e.g. 'int8 whole')")
    args = p.parse_args(argv)
    threads = set_threads(args.threads)
    dtype, why = resolve_dtype(args.dtype, torch.device("cpu"))
    print(describe(threads))
    print(f"compute dtype {str(dtype).removeprefix('torch.')} ({why}); one LLaVA-1.5-7B decoder layer's seven "
          f"linears, ms (median of {args.repeats}; spread = max - min summed over the seven)")
    g = torch.Generator().manual_seed(0)
    layer = [(name, paths(torch.randn(n, k, generator=g) * 0.02, dtype)) for name, n, k in LAYER]
    names = [n for n in layer[0][1] if n not in args.skip]
    print("| rows | " + " | ".join(names) + " | " + " | ".join(f"{n} / float" for n in names[1:]) + " |")
    print("|---|" + "---|" * (2 * len(names) - 1))
    for rows in args.rows:
        total = {}
        for name in names:
            runs = [repeat(lambda: fns[name](x), args.repeats)
                    for (_, fns), x in ((lf, torch.randn(rows, k, generator=g).to(dtype))
                                        for lf, (_, _, k) in zip(layer, LAYER))]
            total[name] = (1e3 * sum(r.median for r in runs), 1e3 * sum(r.spread for r in runs))
        cells = [f"{total[n][0]:.1f} ±{total[n][1]:.1f}" for n in names]
        ratios = [f"{total[n][0] / total['float'][0]:.2f}" for n in names[1:]]
        print(f"| {rows} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
