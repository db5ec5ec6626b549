"""Weight-only int8 / int4 quantization of the decoder's linears (q/k/v/o, gate/up/down and lm_head).

What a checkpoint stores for a quantized linear `NAME` with weight w [out, in]:

    int8  NAME.weight int8 [out, in], NAME.scale bf16 [out]:          w[n, k] ~ weight[n, k] * scale[n]
    int4  NAME.weight uint8 [out, in/2], NAME.scale bf16 [out, in/G],
          NAME.zero uint8 [out, in/G]:    w[n, k] ~ (q[n, k] - zero[n, k // G]) * scale[n, k // G]
          with q in [0, 15] packed two to a byte, the even k in the low nibble.

Scales are bf16 because torch's weight-only kernels take bf16 scales; quantizing picks q for the rounded
scale, so that rounding costs nothing. Embeddings, norms, the vision tower and the projector stay float.

The matmul each linear runs was chosen by measurement (benchmarks/kernels.py; the table is in docs/cpu.md):
- few rows (decode): torch's weight-only kernels, _weight_int8pack_mm and _weight_int4pack_mm_for_cpu, with
  bf16 activations; they read one byte (int8) or half a byte (int4) per weight, 4-8x less than fp32.
- many rows (prefill): the blockwise path. A block of output channels, a few MiB, is dequantized to the
  activations' dtype while it sits in cache and multiplied by a float GEMM into its output columns. That
  costs 5-20% over a float GEMM; the weight-only kernels are 1.3-3x slower there, and so is dequantizing a
  whole matrix before one GEMM (its float copy does not fit in cache).
- int4's CPU kernel wants a packed layout that depends on the CPU's vector width, so `load` repacks the
  stored nibbles once (`pack_for_cpu`), in place of the stored form; the blockwise path reads that layout,
  and state_dict gives the stored form back, so a packed model can be saved.
- Off the CPU (CUDA, MPS), and where the CPU layout is unknown, every row count takes the blockwise path.
Those are the defaults (CANDIDATES); at load, kernels.py times the candidates on the machine itself and a
kernel that is faster there replaces the default.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import torch
from torch import nn

from ..config import QuantConfig
from .int8act import int8_activation_matmul

# Decoder linears that are quantized, by module name; everything else stays float.
QUANTIZED = re.compile(r"llm\.(layers\.\d+\.(attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)|lm_head)")
# Up to this many rows (tokens in a pass) the weight-only kernels win; above, the blockwise GEMM path does. The
# crossovers measured (docs/cpu.md) lie at 32-64 rows for int8, and for int4 at ~160 rows with bf16 and ~350
# with fp32 on AVX2 kernels; prompts with an image have 600+ rows, decode steps one per sample.
INT8_KERNEL_MAX_ROWS = 32
INT4_KERNEL_MAX_ROWS = 128
BLOCK_BYTES = 4 << 20      # a dequantized block of the weight this large stays in the caches of common CPUs...
MIN_BLOCK_ROWS = 256       # ...but a GEMM with fewer output columns runs below peak (down_proj, 11008 wide)
SCALE_FLOOR = 1e-30        # a scale for all-zero rows and groups (any positive value reproduces zeros)
# The matmuls a path may run in each regime (decode: up to the row counts above; prefill: more), the default
# first: the fastest on the development box. A kernel chosen on one box need not suit another (int8 activations
# at one row: 1.2x faster than the weight-only kernel on an AMD EPYC, 1.8x slower on an Intel Xeon with AMX), so
# kernels.py measures them at load and picks per machine.
CANDIDATES = {
    "int8": {"decode": ("weight_int8pack_mm", "blockwise"), "prefill": ("blockwise", "weight_int8pack_mm")},
    "int8 + int8 activations": {"decode": ("int_mm", "weight_int8pack_mm"), "prefill": ("int_mm", "blockwise")},
    "int4": {"decode": ("weight_int4pack_mm", "blockwise"), "prefill": ("blockwise", "weight_int4pack_mm")},
}
REGIMES = ("decode", "prefill")


def default_kernels(path: str) -> dict[str, str]:
    """regime -> the default kernel of a path ("int8", "int8 + int8 activations" or "int4")."""
    return {regime: CANDIDATES[path][regime][0] for regime in REGIMES}


def quantize_weight(w: torch.Tensor, quant: QuantConfig) -> dict[str, torch.Tensor]:
    """The stored tensors of one float weight [out, in], keyed by suffix ("weight", "scale", "zero")."""
    w = w.detach().float()
    if quant.method == "int8":
        scale = (w.abs().amax(1) / 127).clamp(min=SCALE_FLOOR).bfloat16()
        q = (w / scale.float()[:, None]).round().clamp(-127, 127)
        return {"weight": q.to(torch.int8), "scale": scale}
    N, K = w.shape
    groups = w.view(N, K // quant.group_size, quant.group_size)
    lo, hi = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)  # 0 in range: zeros stay exact
    scale = ((hi - lo) / 15).clamp(min=SCALE_FLOOR).bfloat16()
    zero = (-lo / scale.float()).round().clamp(0, 15)
    q = (groups / scale.float()[..., None] + zero[..., None]).round().clamp(0, 15).to(torch.uint8).view(N, K)
    return {"weight": pack_int4(q), "scale": scale, "zero": zero.to(torch.uint8)}


def stored_shapes(out_features: int, in_features: int, quant: QuantConfig) -> dict[str, tuple[tuple, torch.dtype]]:
    """Shape and dtype of each stored tensor of a quantized linear."""
    if quant.method == "int8":
        return {"weight": ((out_features, in_features), torch.int8), "scale": ((out_features,), torch.bfloat16)}
    groups = in_features // quant.group_size
    return {"weight": ((out_features, in_features // 2), torch.uint8),
            "scale": ((out_features, groups), torch.bfloat16), "zero": ((out_features, groups), torch.uint8)}


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [n, k] values 0..15 -> the stored form, uint8 [n, k/2], the even k in the low nibble."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [n, k/2] two nibbles per byte -> uint8 [n, k], values 0..15."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)


class QuantLinear(nn.Module):
    """A linear whose weight is stored quantized (its bias, if any, in floating point); subclasses say how to
    dequantize and which kernel to call."""

    def __init__(self, in_features: int, out_features: int, quant: QuantConfig, device=None, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.quant = in_features, out_features, quant
        for name, (shape, dtype) in stored_shapes(out_features, in_features, quant).items():
            self.register_buffer(name, torch.empty(shape, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False) if bias else None
        self.chosen = {}  # path -> regime -> kernel, where kernels.py chose them (else the defaults run)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, quant={self.quant}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x.reshape(-1, self.in_features))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def dequantize_rows(self, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
        """Output channels start..end-1 of the weight, as floats [end - start, in_features]."""
        raise NotImplementedError

    def run(self, kernel: str, x: torch.Tensor) -> torch.Tensor:
        """x [M, in] @ weight.T by the named kernel (one of CANDIDATES)."""
        raise NotImplementedError

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.dequantize_rows(0, self.out_features, dtype)

    def row_block(self) -> int:
        """dequantize_rows takes row ranges in multiples of this."""
        return 1

    def block_rows(self, dtype: torch.dtype) -> int:
        """Output channels dequantized at a time by blockwise_matmul for activations of `dtype`."""
        unit = self.row_block()
        step = max(MIN_BLOCK_ROWS, BLOCK_BYTES // (self.in_features * dtype.itemsize))
        return max(unit, step // unit * unit)

    def path(self) -> str:
        """Which kernels apply: "int8", "int8 + int8 activations" or "int4"."""
        raise NotImplementedError

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, in] @ weight.T by the kernel chosen for the path and for M rows; off the CPU, blockwise."""
        if x.device.type != "cpu":
            return self.blockwise_matmul(x)
        kernels = self.chosen.get(self.path()) or default_kernels(self.path())
        return self.run(kernels["decode" if x.shape[0] <= self.DECODE_ROWS else "prefill"], x)

    def blockwise_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, in] @ weight.T, dequantizing a block of output channels at a time while it is in cache."""
        step = self.block_rows(x.dtype)
        out = x.new_empty(x.shape[0], self.out_features)
        for start in range(0, self.out_features, step):
            end = min(start + step, self.out_features)
            torch.mm(x, self.dequantize_rows(start, end, x.dtype).t(), out=out[:, start:end])
        return out


class Int8Linear(QuantLinear):
    activations = "float"  # "int8": the activations are quantized too and multiplied in integers (set_activations)
    DECODE_ROWS = INT8_KERNEL_MAX_ROWS

    def path(self) -> str:
        return "int8" if self.activations == "float" else "int8 + int8 activations"

    def dequantize_rows(self, start, end, dtype):
        return self.weight[start:end].to(dtype).mul_(self.scale[start:end, None])

    def run(self, kernel: str, x: torch.Tensor) -> torch.Tensor:
        if kernel == "int_mm":
            return int8_activation_matmul(x, self.weight, self.scale)
        if kernel == "weight_int8pack_mm" and int8_kernel_fits(self.in_features):
            # other widths run blockwise; activations whose address is not a multiple of 32 bytes crash it (copied)
            a = x.to(torch.bfloat16)
            a = a if a.data_ptr() % 32 == 0 else a.clone()
            return torch._weight_int8pack_mm(a, self.weight, self.scale).to(x.dtype)
        return self.blockwise_matmul(x)


def int8_kernel_fits(width: int) -> bool:
    """Whether torch's weight-only int8 kernel computes right for inputs `width` wide: it (2.13, AVX-512) returned
    garbage (1e33) at one row and crashed from two for widths that are not a multiple of 16 (docs/cpu.md)."""
    return width % 16 == 0


@functools.cache
def cpu_int4_block() -> int | None:
    """Output channels per block in the layout of torch's CPU int4 kernel, or None if it is not the one we know.

    torch._convert_weight_to_int4pack_for_cpu stores [out/B, in, B/2] bytes: for each block of B output
    channels and each input, the low nibble holds channel j and the high nibble channel j + B/2 (B = 64 with
    AVX-512, 32 with AVX2). The layout is not part of torch's API, so it is checked on a probe against torch's
    own packing; where it differs, int4 weights stay in their stored form and run the blockwise path.
    """
    q = torch.randint(0, 16, (128, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    return next((block for block in (64, 32, 16) if torch.equal(repack_for_cpu(pack_int4(q), block), packed)), None)


def repack_for_cpu(stored: torch.Tensor, block: int) -> torch.Tensor:
    """The stored nibbles [out, in/2] -> the CPU kernel's layout, byte by byte: what torch's own packing makes,
    2-4x faster (torch's reads int32 values, eight bytes for each byte it writes)."""
    N, half = stored.shape
    rows = stored.view(N // block, 2, block // 2, half).transpose(2, 3)  # nb, channel j / j + B/2, in/2, B/2
    low, high = rows[:, 0], rows[:, 1]
    even = (low & 15) | (high << 4)                                      # input 2i: the low nibbles of both
    odd = (low >> 4) | (high & 0xF0)                                     # input 2i+1: the high nibbles of both
    return torch.stack((even, odd), dim=2).view(N, half)                 # nb, in/2, 2, B/2 = nb, in, B/2


def unpack_cpu_int4(packed: torch.Tensor, block: int, start: int, end: int, in_features: int) -> torch.Tensor:
    """Rows start..end-1 (multiples of `block`) of q, uint8 [end - start, in], from the CPU kernel's layout."""
    blocks = packed.view(-1, in_features, block // 2)[start // block:end // block]  # nb, in, B/2
    q = torch.cat((blocks & 15, blocks >> 4), dim=-1)                              # nb, in, B
    return q.transpose(1, 2).reshape(end - start, in_features)


class Int4Linear(QuantLinear):
    packed_for_cpu = None  # (packed weight, table of scale and offset) in the layout of torch's CPU kernel
    DECODE_ROWS = INT4_KERNEL_MAX_ROWS

    def path(self) -> str:
        return "int4"

    def pack_for_cpu(self):
        """Replace the stored tensors by the CPU kernel's layout, where that layout is known and fits the shape
        (whole blocks of output channels). state_dict still gives the stored form.

        The kernel computes (q - 8) * scale + offset, so the zero point becomes offset = (8 - zero) * scale.
        """
        block = cpu_int4_block()
        if self.packed_for_cpu is not None or block is None or self.out_features % block:
            return
        packed = repack_for_cpu(self.weight, block)
        scale = self.scale.float()
        offset = (8 - self.zero.float()) * scale
        table = torch.stack((scale, offset), dim=-1).transpose(0, 1).to(torch.bfloat16).contiguous()  # in/G, out, 2
        del self.weight, self.scale, self.zero  # the weights are never held twice
        self.packed_for_cpu = (packed, table)

    def row_block(self) -> int:
        return 1 if self.packed_for_cpu is None else cpu_int4_block()

    def dequantize_rows(self, start, end, dtype):
        G = self.quant.group_size
        # In-place ops on the freshly converted block: several times faster than broadcasting out-of-place ones.
        if self.packed_for_cpu is None:
            w = unpack_int4(self.weight[start:end]).unflatten(-1, (-1, G)).to(dtype)       # n, in/G, G
            w.sub_(self.zero[start:end, :, None]).mul_(self.scale[start:end, :, None])
            return w.flatten(-2)
        packed, table = self.packed_for_cpu
        w = unpack_cpu_int4(packed, cpu_int4_block(), start, end, self.in_features).unflatten(-1, (-1, G)).to(dtype)
        scale, offset = table[:, start:end].transpose(0, 1).to(dtype).unbind(-1)         # n, in/G each
        w.mul_(scale.contiguous()[..., None]).add_((offset - 8 * scale).contiguous()[..., None])
        return w.flatten(-2)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.packed_for_cpu is None:
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        packed, table = self.packed_for_cpu
        q = unpack_cpu_int4(packed, cpu_int4_block(), 0, self.out_features, self.in_features)
        scale, offset = table.transpose(0, 1).float().unbind(-1)
        destination[prefix + "weight"] = pack_int4(q)
        destination[prefix + "scale"] = scale.to(torch.bfloat16)
        destination[prefix + "zero"] = (8 - offset / scale).round().to(torch.uint8)  # exact: |rounding| < 0.02

    def run(self, kernel: str, x: torch.Tensor) -> torch.Tensor:
        if kernel != "weight_int4pack_mm" or self.packed_for_cpu is None:  # not in the kernel's layout: blockwise
            return self.blockwise_matmul(x)
        packed, table = self.packed_for_cpu
        y = torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), packed, self.quant.group_size, table)
        return y.to(x.dtype)


LINEARS = {"int8": Int8Linear, "int4": Int4Linear}


def quantized_modules(model: nn.Module):
    """(name, module) of the linears that quantization replaces."""
    return [(name, m) for name, m in model.named_modules() if QUANTIZED.fullmatch(name)]


def replace_linears(model: nn.Module, quant: QuantConfig, device=None):
    """Swap the decoder's nn.Linear modules for empty quantized ones (on `device`, e.g. meta); the decoder's code
    does not change."""
    for name, linear in quantized_modules(model):
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, LINEARS[quant.method](
            linear.in_features, linear.out_features, quant, device, bias=linear.bias is not None))


def quantized_linear(weight: torch.Tensor, quant: QuantConfig, pack: bool = True) -> QuantLinear:
    """One linear holding the float `weight` [out, in] quantized as `quant` says (benchmarks and tests build them
    one at a time); pack=True puts int4 in the CPU kernel's layout where it is known, as `load` does."""
    linear = LINEARS[quant.method](weight.shape[1], weight.shape[0], quant)
    for suffix, tensor in quantize_weight(weight, quant).items():
        getattr(linear, suffix).copy_(tensor)
    if pack and isinstance(linear, Int4Linear):
        linear.pack_for_cpu()
    return linear


def pack_for_device(model: nn.Module):
    """Put int4 weights in the layout of the kernel that the model's device runs (a no-op off the CPU)."""
    for _, m in model.named_modules():
        if isinstance(m, Int4Linear) and m.packed_for_cpu is None and m.weight.device.type == "cpu":
            m.pack_for_cpu()


@torch.no_grad()
def quantize_model(model, quant: QuantConfig, *, pack: bool = True):
    """Quantize a float LlavaModel's decoder linears in place and record `quant` in its config.

    pack=True puts int4 weights in the CPU kernel's layout when the model is on a CPU, as `load` does;
    pack=False keeps the stored form, which runs the blockwise path at every row count.
    """
    if model.config.quant is not None:
        raise ValueError(f"the model is already quantized ({model.config.quant.method})")
    model.config = dataclasses.replace(model.config, quant=quant)  # validates group_size against the shapes
    weights = {name: (linear.weight, linear.bias) for name, linear in quantized_modules(model)}
    replace_linears(model, quant, device=model.device)
    for name, linear in quantized_modules(model):
        weight, bias = weights.pop(name)
        for suffix, tensor in quantize_weight(weight, quant).items():
            getattr(linear, suffix).copy_(tensor)
        if bias is not None:
            linear.bias = nn.Parameter(bias.detach(), requires_grad=False)
    if pack:
        pack_for_device(model)
    return model


def is_quantized_weight(name: str) -> bool:
    """Whether a float checkpoint tensor name is the weight of a linear that quantization replaces."""
    return name.endswith(".weight") and QUANTIZED.fullmatch(name.removesuffix(".weight")) is not None


def quantized_tensors(name: str, tensor: torch.Tensor, quant: QuantConfig | None, float_dtype=None):
    """The stored (name, tensor) pairs for one float checkpoint tensor: its quantized form, or itself (cast to
    float_dtype if given). Quantization reads the tensor in its own precision."""
    if quant is None or not is_quantized_weight(name):
        return [(name, tensor if float_dtype is None else tensor.to(float_dtype))]
    prefix = name.removesuffix("weight")
    return [(prefix + suffix, t) for suffix, t in quantize_weight(tensor, quant).items()]
