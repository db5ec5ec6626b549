"""Quantized decoder linears: int8 (a scale per output channel) and int4 (a scale and zero point per group),
weight-only or, for int8 on a CPU, with int8 activations too; the kernel each runs, measured on the machine
(kernels.py); and the int4 weights in the CPU kernel's layout, stored beside a checkpoint (int4cpu.py). The loader
(checkpoint.py) puts them in place of nn.Linear."""

from .int4cpu import read_cpu_layout, use_cpu_layout, write_cpu_layout
from .int8act import ACTIVATIONS, int8_activation_matmul, int8_gemm_exact
from .kernels import KernelChoice, choose_kernels, set_activations, use_kernels
from .linear import (Int4Linear, Int8Linear, QuantLinear, pack_for_device, quantize_model, quantize_weight,
                     quantized_modules, quantized_tensors, replace_linears)

__all__ = ["ACTIVATIONS", "Int4Linear", "Int8Linear", "KernelChoice", "QuantLinear", "choose_kernels",
           "int8_activation_matmul", "int8_gemm_exact", "pack_for_device", "quantize_model", "quantize_weight",
           "quantized_modules", "quantized_tensors", "read_cpu_layout", "replace_linears", "set_activations",
           "use_cpu_layout", "use_kernels", "write_cpu_layout"]
