"""Performance benchmarks (``python -m bench.<name>``); see docs/performance.md.

Importing the package pins the BLAS/OpenMP thread pools before torch is imported (setting them
afterwards does not resize OpenMP's pool) and quiets per-call library chatter, so that every
bench runs with the same thread count and its progress lines stay readable.

OMP_WAIT_POLICY=PASSIVE: on this 2-core machine shared with other jobs, OpenMP's default
spin-waiting at every parallel-region barrier made a 2-thread SmolLM2 forward 6-18x slower at
load ~5 (the spinning thread holds a core while its partner is descheduled); measured here:
a 4 x 60-token forward took 9.9 s spinning, 1.7 s passive. Passive threads sleep instead.
"""

from __future__ import annotations

import os
import warnings


def _default_threads() -> int:
    """All cores this process may use, at most 2: the benchmark machine has 2."""
    return max(1, min(2, len(os.sched_getaffinity(0))))


for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, str(_default_threads()))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use.*")
warnings.filterwarnings("ignore", category=FutureWarning)
