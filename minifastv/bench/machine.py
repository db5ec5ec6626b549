"""One line that says which machine a benchmark ran on: every figure is printed with it."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from ..machine import cpu_has_native_bf16, physical_cores


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def describe(threads: int | None = None) -> str:
    mem = memory_gib()
    return (f"machine: {cpu_name()}, {physical_cores()} physical cores ({os.cpu_count()} logical), "
            f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}, "
            f"native bf16 {'yes' if cpu_has_native_bf16() else 'no'}"
            + (f", {mem:.0f} GiB RAM" if mem else "")
            + f"; torch {torch.__version__}, {threads or torch.get_num_threads()} threads")
