"""Timing helpers shared by the benchmarks: prefill and decode speed of a generation, medians over repeats."""

from __future__ import annotations

import statistics
import time
from typing import NamedTuple

import torch

from ..models.generate import stream


class Timing(NamedTuple):
    prefill_s: float                 # median seconds until the first token
    decode_tok_s: float | None       # median tokens/s after it (None when a run generates one token)
    tokens: int                      # tokens a run generated
    runs: int                        # runs the medians are taken over (after a warm-up)
    prefills: tuple[float, ...] = ()  # each run's seconds until the first token


class Runs(NamedTuple):
    """Repeated timings of one thing, in seconds."""
    median: float
    low: float
    high: float

    @property
    def spread(self) -> float:
        return self.high - self.low


def repeat(fn, repeats: int) -> Runs:
    """fn() timed `repeats` times after one untimed warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return Runs(statistics.median(times), min(times), max(times))


def timed(generate_fn, repeats: int) -> Timing:
    """Prefill and decode speed over `repeats` runs after a warm-up. generate_fn(on_token) must call
    on_token() as each token appears."""
    prefills, rates = [], []
    for i in range(repeats + 1):
        stamps = [time.perf_counter()]
        generate_fn(lambda: stamps.append(time.perf_counter()))
        if i:  # run 0 is the warm-up
            prefills.append(stamps[1] - stamps[0])
            if len(stamps) > 2:
                rates.append((len(stamps) - 2) / (stamps[-1] - stamps[1]))
    return Timing(statistics.median(prefills), statistics.median(rates) if rates else None, len(stamps) - 1,
                  len(prefills), tuple(prefills))


def spread_ms(seconds) -> str:
    """The spread of repeated timings, as printed beside their median: max - min in ms."""
    return f"{(max(seconds) - min(seconds)) * 1e3:.1f}" if len(seconds) > 1 else "-"


def rate(tokens_per_s: float | None) -> str:
    return "-" if tokens_per_s is None else f"{tokens_per_s:.1f}"


def minifastv_generate(model, ids, pixels, n: int, prune=None):
    def run(on_token):
        with torch.inference_mode():
            for _ in stream(model, ids, pixels, max_new_tokens=n, prune=prune):
                on_token()
    return run
