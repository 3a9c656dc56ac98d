"""Shared timing helpers: interleaved repetitions, medians, spreads, machine load.

Why interleave: the benchmark machine's cores are shared with other jobs, so load drifts over
minutes. Running the variants round-robin exposes them to the same drift, and the
per-repetition ratio B_i / A_i cancels most of it; the median of those ratios is the reported
number. Odd repetitions run the variants in reverse order (A B C, C B A, ...) so that a
variant never always runs right after the same neighbour (cache state, thermal drift).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

WIDE_SPREAD = 0.25  # (max - min) / median of a ratio above this: the run was too noisy


def load1() -> float:
    """1-minute load average (the number `uptime` prints first)."""
    return os.getloadavg()[0]


def cores() -> int:
    return len(os.sched_getaffinity(0))


@dataclass
class Timings:
    """Wall seconds per variant and repetition (warm-up dropped), plus what each rep reported."""

    times: dict[str, list[float]]
    parts: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    loads: list[float] = field(default_factory=list)

    def __getitem__(self, name: str) -> list[float]:
        return self.times[name]

    def load_note(self) -> str:
        return f"load {min(self.loads):.1f}-{max(self.loads):.1f} on {cores()} cores"


def interleave(
    variants: Mapping[str, Callable[[], object]],
    reps: int,
    warmup: int = 1,
    *,
    progress: bool = True,
) -> Timings:
    """Run the variants round-robin (reversed on odd reps); drop the first `warmup` rounds.

    A variant may return a mapping of named sub-times (seconds); they are kept in `parts`.
    Progress goes to stderr, one line per round, with the load average seen at its start.
    """
    names = list(variants)
    out = Timings({n: [] for n in names}, {n: {} for n in names})
    for rep in range(warmup + reps):
        order = names if rep % 2 == 0 else names[::-1]
        load = load1()
        cells = []
        for name in order:
            start = time.perf_counter()
            ret = variants[name]()
            elapsed = time.perf_counter() - start
            cells.append(f"{name} {elapsed:.3f}s")
            if rep < warmup:
                continue
            out.times[name].append(elapsed)
            if isinstance(ret, Mapping):
                for key, value in ret.items():
                    out.parts[name].setdefault(key, []).append(float(value))
        if rep >= warmup:
            out.loads.append(load)
        if progress:
            tag = "warm-up" if rep < warmup else f"{rep - warmup + 1}/{reps}"
            print(f"  [{tag}] {' | '.join(cells)}  (load {load:.1f})", file=sys.stderr, flush=True)
    if not out.loads:
        out.loads.append(load1())
    return out


def median_spread(values: list[float]) -> tuple[float, float, float]:
    """(median, min, max)."""
    return statistics.median(values), min(values), max(values)


def rel_spread(values: list[float]) -> float:
    med, lo, hi = median_spread(values)
    return (hi - lo) / med if med else float("inf")


def ratios(num: list[float], den: list[float]) -> list[float]:
    """Per-repetition ratios num_i / den_i (paired by repetition)."""
    return [n / d for n, d in zip(num, den, strict=True)]


def best_ratio(num: list[float], den: list[float]) -> float:
    """min(num) / min(den): the ratio of best-of-n times. Contention from other jobs only ever
    slows a run down, so each variant's fastest repetition is its least disturbed one; a
    cross-check for the median of paired ratios when the machine is busy."""
    return min(num) / min(den)


def fmt_times(values: list[float], unit: str = "s", scale: float = 1.0) -> str:
    med, lo, hi = (v * scale for v in median_spread(values))
    return f"median {med:.3f}{unit} [min {lo:.3f}, max {hi:.3f}] (n={len(values)})"


def fmt_ratio(values: list[float]) -> str:
    med, lo, hi = median_spread(values)
    return f"{med:.3f} [{lo:.3f}-{hi:.3f}]"


def spread_warning(values: list[float], what: str) -> str | None:
    """A line to print when a ratio's spread is too wide to trust (None when it is fine)."""
    s = rel_spread(values)
    if s <= WIDE_SPREAD:
        return None
    return (f"WARNING: {what} spread {s:.0%} of its median (> {WIDE_SPREAD:.0%}): the machine "
            "was busy; rerun when `uptime` is low, or with more --reps")  # fmt: skip


def set_threads(n: int | None = None) -> int:
    """Pin torch's intra-op threads (default: OMP_NUM_THREADS as bench/__init__ set it)."""
    import torch

    n = n or int(os.environ.get("OMP_NUM_THREADS", "0")) or min(2, cores())
    torch.set_num_threads(n)
    return n


def header(title: str, threads: int) -> str:
    """First output line: what runs, on which machine, at which load."""
    return (f"# {title} | CPU: {cores()} cores usable, torch {threads} threads, "
            f"load avg {' '.join(f'{x:.2f}' for x in os.getloadavg())}")  # fmt: skip
