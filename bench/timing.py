"""Shared timing helpers: interleaved repetitions, medians, spreads.

Why interleave: the benchmark machine's cores are shared with other jobs, so load drifts over
minutes. Running A,B,A,B... exposes both variants to the same drift, and the per-repetition
ratio B_i/A_i cancels most of it; the median of those ratios is the reported number.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping


def interleave(
    variants: Mapping[str, Callable[[], object]], reps: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Wall seconds of each variant per repetition, variants run round-robin; warm-up dropped."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for rep in range(warmup + reps):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if rep >= warmup:
                times[name].append(elapsed)
    return times


def median_spread(values: list[float]) -> tuple[float, float, float]:
    """(median, min, max)."""
    return statistics.median(values), min(values), max(values)


def ratios(num: list[float], den: list[float]) -> list[float]:
    """Per-repetition ratios num_i / den_i (paired by repetition)."""
    return [n / d for n, d in zip(num, den, strict=True)]


def fmt_times(values: list[float], unit: str = "s") -> str:
    med, lo, hi = median_spread(values)
    return f"median {med:.3f}{unit} [min {lo:.3f}, max {hi:.3f}] (n={len(values)})"


def fmt_ratio(values: list[float]) -> str:
    med, lo, hi = median_spread(values)
    return f"{med:.3f} [{lo:.3f}-{hi:.3f}]"


def set_threads(n: int | None = None) -> int:
    """Pin torch's intra-op threads (default: all cores the process may use, at most 2)."""
    import os

    import torch

    n = n or min(2, len(os.sched_getaffinity(0)))
    torch.set_num_threads(n)
    return n
