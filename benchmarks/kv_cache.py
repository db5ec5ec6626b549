"""A 7B decode step with the float KV cache (fp32 on a CPU) against the int8 one (models/cache_int8.py), after
prompts of LLaVA-1.5's, Video-LLaVA's and LLaVA-NeXT's lengths (docs/cpu.md, "The int8 KV cache").

The LLaVA-1.5-7B decoder with random int8 (or int4) weights, built in memory, and a cache of each kind filled with
the same random keys and values; then, in one process, --rounds rounds alternating the two caches, each timing
--steps greedy decode steps: step time (median of rounds, with the spread), and the cache's bytes.

    python benchmarks/kv_cache.py [--quant int8] [--contexts 632 2112 2984] [--steps 6] [--rounds 3] [--threads 2]
                                  [--layers 32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from decode_profile import fill_cache, random_decoder, steps

from minifastv.bench.machine import describe
from minifastv.config import QuantConfig
from minifastv.machine import auto_dtype
from minifastv.models import Int8KVCache, KVCache


@torch.inference_mode()
def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quant", choices=["int8", "int4"], default="int8")
    p.add_argument("--contexts", type=int, nargs="+", default=[632, 2112, 2984])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--layers", type=int, default=32, help="decoder layers (the tables are of all 32)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = auto_dtype(torch.device("cpu"))[0]
    print(describe())
    quant = QuantConfig("int8") if args.quant == "int8" else QuantConfig("int4", 128)
    model = random_decoder(quant, args.layers, dtype)
    print(f"LLaVA-1.5-7B decoder, {args.layers} layers, {args.quant} linears, float parts "
          f"{str(dtype).removeprefix('torch.')}; {args.rounds} rounds alternating the caches, "
          f"{args.steps} decode steps each\n")
    print("| tokens in the cache | float cache ms/step (spread) | int8 cache ms/step (spread) | int8 / float | "
          "float cache GiB | int8 cache GiB |\n|---|---|---|---|---|---|")
    for context in args.contexts:
        times, sizes = {KVCache: [], Int8KVCache: []}, {}
        for _ in range(args.rounds):
            for kind, runs in times.items():
                cache = fill_cache(model, context, kind)
                sizes[kind] = cache.nbytes() / 2**30
                position = steps(model, cache, torch.tensor([context]), 1)          # warm-up step
                start = time.perf_counter()
                steps(model, cache, position, args.steps)
                runs.append((time.perf_counter() - start) / args.steps * 1e3)
                del cache
        (f, fs), (i, is_) = ((statistics.median(t), max(t) - min(t)) for t in times.values())
        print(f"| {context} | {f:.0f} ({fs:.0f}) | {i:.0f} ({is_:.0f}) | {i / f:.2f} | {sizes[KVCache]:.2f} | "
              f"{sizes[Int8KVCache]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
