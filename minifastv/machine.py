"""What the machine offers: which devices exist, whether its CPU computes bf16 natively, how many cores it has.

The float dtype matters more on a CPU than anywhere else: without AVX512-BF16 or AMX, torch emulates bf16
matmuls and they run several times slower than fp32 (docs/cpu.md).
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEVICES = ("cpu", "cuda", "mps")


def resolve_device(name: str | torch.device) -> torch.device:
    """A torch.device that this machine has, or a ValueError that says which one is missing."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device {str(name)!r} is not a device name; choose one of {', '.join(DEVICES)}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        built = "" if torch.backends.cuda.is_built() else f" (torch {torch.__version__} is built without CUDA)"
        raise ValueError(f"device {str(name)!r}: CUDA is not available on this machine{built}")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(name)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(name)!r}: MPS (Apple GPU) is not available on this machine")
    if device.type not in DEVICES:
        raise ValueError(f"device {str(name)!r} is not supported; choose one of {', '.join(DEVICES)}")
    return device


def cpu_name() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it (elsewhere what platform knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX on x86; elsewhere torch's CPU bf16 matmuls are emulated (or not known to be fast)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


# Below this many bytes of fp32 decoder weights, bf16 is slower than fp32 on a CPU even with native bf16: the
# weights fit in cache, so halving the bytes saves nothing, and the casts around each op cost (decode, 2 cores,
# bf16/fp32 speed: 0.81 at 4 MiB (the tiny model's shape), 0.92 at 14 MiB, 1.39 at 43 MiB, 1.56 at 102 MiB;
# docs/cpu.md, "Float dtype").
SMALL_DECODER_BYTES = 32 << 20


def decoder_fp32_bytes(text) -> int:
    """Bytes of the decoder's weights (layers, final norm, lm_head) in fp32: what a decode step reads."""
    attention = text.dim * text.head_dim * (2 * text.n_heads + 2 * text.n_kv_heads)
    layer = attention + 3 * text.dim * text.intermediate_size + 2 * text.dim
    return 4 * (text.n_layers * layer + text.dim + text.vocab_size * text.dim)


def auto_dtype(device: torch.device, config=None) -> tuple[torch.dtype, str]:
    """The float dtype to compute in on `device` (for the model of `config`, when given), and why."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "CUDA device with bf16"
        return torch.float16, "CUDA device without bf16"
    if device.type == "mps":
        return torch.float16, "MPS device"
    if cpu_has_native_bf16():
        if config is not None and decoder_fp32_bytes(config.text) < SMALL_DECODER_BYTES:  # float or quantized
            size = decoder_fp32_bytes(config.text) / 2**20
            return torch.float32, (f"a small model: {size:.0f} MiB of fp32 decoder weights, under the "
                                   f"{SMALL_DECODER_BYTES >> 20} MiB where bf16 starts to pay on a CPU")
        return torch.bfloat16, "the CPU has native bf16 (AVX512-BF16 or AMX)"
    return torch.float32, "the CPU has no native bf16, so bf16 would be emulated and slow"


def parse_dtype(dtype) -> torch.dtype | None:
    """A float dtype from its name (or a torch.dtype, or None)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_dtype(dtype, device: torch.device, config=None) -> tuple[torch.dtype | None, str]:
    """The float dtype to load into, and why: "auto" (chosen for the device and, given its config, the model),
    a name or torch.dtype, or None (keep the stored dtype)."""
    if dtype == "auto":
        return auto_dtype(device, config)
    if dtype is not None and not isinstance(dtype, torch.dtype) and dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}")
    return parse_dtype(dtype), "as asked" if dtype is not None else "as stored"


def physical_cores() -> int:
    """Cores this process may run on, counting each physical core once (hyperthreads share one core's
    arithmetic units, so a second thread per core rarely speeds up a matmul)."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in allowed:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(),
                       (topology / "core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))  # no topology (not Linux): count logical CPUs
    return max(1, len(cores))


def set_threads(n: int | None) -> int:
    """Use n threads for torch's CPU kernels (default: the physical cores); returns the count in use."""
    if n is None:
        n = physical_cores()
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"threads must be a positive integer, got {n!r}")
    torch.set_num_threads(n)
    return n


def peak_rss_bytes() -> int | None:
    """The most resident memory this process has held so far (mapped weight files included); None where the
    platform does not say. Linux's VmHWM starts afresh at exec, unlike getrusage's ru_maxrss, which a child
    process inherits from the parent that forked it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def release_free_memory():
    """Give the operating system back the memory that the C allocator keeps after frees (glibc's
    malloc_trim; elsewhere nothing happens). Loading reads and converts tensors one at a time, and glibc
    would otherwise keep about half a GiB of those transient buffers for the life of a 7B process."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
