"""Checkpoints are data, never code.

A run directory is input like any other: a file planted in ``checkpoints/step_*/`` must not run
when a job resumes. Every ``torch.load`` in a training process is forced weights-only (the
``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` switch reaches DeepSpeed's and megatron's own loads too, and
child processes inherit it), with an explicit allow-list of the few non-tensor types the
engines write. Before a checkpoint is loaded, every ``*.pt`` file in it is scanned statically,
so a refusal names the file and the offending global instead of failing deep inside an engine.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch

from config.errors import UserError

FORCE_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


class UnsafeCheckpoint(UserError):
    """A checkpoint file holds something other than tensors and the allow-listed types."""


def _engine_types() -> list:
    """What DeepSpeed and numpy-based RNG states put in the pickles the engines write."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct

    types: list = [np.ndarray, np.dtype, _reconstruct]
    types += [type(np.dtype(code)) for code in ("b", "B", "i", "I", "l", "L", "q", "f", "d", "?")]
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum

        types += [ZeroStageEnum, LossScaler, DynamicLossScaler]
    except ImportError:  # deepspeed is a dependency; tolerate its absence in minimal installs
        pass
    return types


_allowed = False


def enforce_weights_only() -> None:
    """Make every later ``torch.load`` in this process (and its children) weights-only."""
    global _allowed
    if not _allowed:
        torch.serialization.add_safe_globals(_engine_types())
        _allowed = True
    os.environ[FORCE_ENV] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)


def unsafe_globals(path: Path) -> list[str]:
    """The globals in a torch checkpoint that a weights-only load would refuse."""
    enforce_weights_only()
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except (ValueError, RuntimeError, KeyError) as exc:  # not a torch zip file at all
        return [f"<not a torch checkpoint: {exc}>"]


def check_checkpoint(directory: Path, patterns: Iterable[str] = ("*.pt", "*.pth", "*.bin")) -> None:
    """Refuse a checkpoint directory that holds any file a weights-only load would not load."""
    directory = Path(directory)
    for pattern in patterns:
        for path in sorted(directory.rglob(pattern)):
            bad = unsafe_globals(path)
            if bad:
                raise UnsafeCheckpoint(
                    f"{path}: refusing to load a checkpoint file that holds pickled objects "
                    f"other than tensors ({', '.join(bad[:5])}); it was not written by "
                    "polyshift, or it was tampered with"
                )


def load_tensors(path: Path, map_location: str | torch.device = "cpu"):
    """``torch.load`` of a file the project wrote, weights-only, with a clear error naming it."""
    enforce_weights_only()
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        if "Weights only load failed" in str(exc) or "Unsupported global" in str(exc):
            raise UnsafeCheckpoint(
                f"{path}: refusing to unpickle a non-tensor object ({str(exc).splitlines()[0]})"
            ) from None
        raise
