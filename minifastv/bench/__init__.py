"""`python -m minifastv bench`: speed and memory measurements that print tables (never timed tests).

fastv.py: FastV's prefill speed-up, minifastv against transformers (when it is installed), achieved TFLOP/s.
cpu7b.py (with --quant int8 int4): LLaVA-1.5-7B at full depth on a CPU, beside llama.cpp (llama_cpp.py).
"""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--quant" in argv:  # the full-depth quantized 7B run has options of its own
        from .cpu7b import main as cpu7b

        return cpu7b(argv)
    from .fastv import main as fastv

    return fastv(argv)
