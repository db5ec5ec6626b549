"""One line that says which machine a benchmark ran on: every figure is printed with it."""

from __future__ import annotations

import os

import torch

from ..machine import cpu_has_native_bf16, cpu_name, physical_cores


def memory_gib() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def describe(threads: int | None = None) -> str:
    mem, threads = memory_gib(), threads or torch.get_num_threads()
    return (f"machine: {cpu_name()}, {physical_cores()} physical cores ({os.cpu_count()} logical), "
            f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}, "
            f"native bf16 {'yes' if cpu_has_native_bf16() else 'no'}"
            + (f", {mem:.0f} GiB RAM" if mem else "")
            + f"; torch {torch.__version__}, {threads} threads" + load_note(threads))


def load_note(threads: int) -> str:
    """The load average, and a warning when it is above the threads a benchmark uses: other work then shares
    the cores, and timings swing by 10x and more."""
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        return ""
    if load <= threads:
        return f"; load average {load:.1f}"
    return (f"; load average {load:.1f}\nwarning: the load average is above the {threads} threads used: other work "
            "shares the cores, so the timings below may be far off and their ratios too")


def spread_warning(what: str, seconds: list[float]) -> str | None:
    """A warning when repeated timings of one thing disagree by more than 2x (a busy box), else None."""
    if len(seconds) > 1 and max(seconds) > 2 * min(seconds):
        return (f"warning: the repeats of {what} disagree by {max(seconds) / min(seconds):.1f}x "
                f"({min(seconds) * 1e3:.1f} to {max(seconds) * 1e3:.1f} ms): the box is busy, so its figures are "
                "unreliable")
    return None
