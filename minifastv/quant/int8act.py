"""int8 activations for an int8 model: the activations are rounded to int8 per row as well, and the matmul runs
in integers (torch._int_mm), where the weight-only paths convert the weights to floats. Selected with
set_activations(model, "int8") or --activations int8, for prefill and decode steps alike.

Measured with 2 threads (docs/cpu.md, "int8 activations"): with AVX-512 VNNI one 4096 x 4096 linear at 632 rows
takes 44 ms in integers where bf16 takes 75 and fp32 202; at one row (a decode step) the integer GEMM reads
the weights ~1.2x faster than torch's weight-only kernel, which converts every weight to a float (on an Intel
Xeon with AMX it was 1.8x slower there: kernels.py measures which is faster per machine, and decode steps take the
weight-only kernel where the integer GEMM loses). With AVX2 alone it is faster than fp32 too, but not exact
(int8_gemm_exact), so it is refused there.
"""

from __future__ import annotations

import functools

import torch

# Longer inputs run in equal passes of at most this many rows (the same numbers: each row is rounded on its own).
# A whole long prompt's temporaries (35-93 MB each at 2,112 rows) cost more than the GEMM gains from its length:
# a 7B layer's linears took 12-17% less time at 2,112 and 2,984 rows in passes of <= 768, 8% less at 1,100
# (docs/cpu.md); passes of 512 rows were 9% slower at 632 rows (512 + 120), which stay one pass here.
MAX_ROWS = 768


def int8_activation_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, in] @ (weight * scale).T with x rounded too: each row to int8 on its own scale (absmax / 127), the
    product in int32 by torch._int_mm, then both scales applied. The activations' rounding is the only error
    added to the weight-only path's."""
    passes = -(-len(x) // MAX_ROWS)
    if passes > 1:
        rows = -(-len(x) // passes)
        return torch.cat([int8_activation_matmul(x[i:i + rows], weight, scale) for i in range(0, len(x), rows)])
    xf = x.float()
    step = xf.abs().amax(1, keepdim=True).clamp(min=1e-30) / 127
    rounded = xf.div(step).round_().to(torch.int8)                  # div makes a new tensor: x is never written
    y = torch._int_mm(rounded, weight.t()).float()
    return y.mul_(step).mul_(scale.float()).to(x.dtype)


@functools.cache
def int8_gemm_exact() -> bool:
    """Whether torch._int_mm multiplies full-range int8 exactly on this CPU. Without AVX-512 VNNI (AVX2), the
    GEMM sums pairs of u8 x s8 products in int16 with saturation, and weights of +-127 overflow it (a
    4096-long dot product came out 1e5 off; weights within +-63 are exact), so int8 activations are refused."""
    g = torch.Generator().manual_seed(0)
    x, w = (torch.randint(-127, 128, shape, dtype=torch.int8, generator=g) for shape in ((32, 512), (64, 512)))
    return torch.equal(torch._int_mm(x, w.t()).long(), x.long() @ w.long().t())


ACTIVATIONS = ("float", "int8")
