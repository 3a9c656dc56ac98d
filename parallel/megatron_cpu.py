"""Megatron-core on CPU with gloo: for tests and debugging, never active on a GPU.

megatron-core assumes CUDA in a handful of places that have nothing to do with the math:

- ``torch.cuda.current_device()`` / ``torch.cuda.synchronize()`` in p2p communication, the
  global memory buffer of local attention and DDP's gradient buffers;
- tensors created with ``device="cuda"`` in ``pipeline_parallel/schedules.py``;
- the CUDA RNG tracker (``fork`` swaps CUDA generator states);
- type checks such as ``grad.type() == "torch.cuda.FloatTensor"`` in gradient clipping.

`enable()` redirects exactly these: the two ``torch.cuda`` calls, the tracker's state swaps
(to the CPU generator), and, through a torch function mode that the engine enters around
megatron calls, any factory call that asks for a CUDA device and the type names a CPU tensor
reports. The model math is untouched, so what runs here is the same code path as on a GPU,
minus kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_enabled = False


def _is_cuda(device: Any) -> bool:
    if isinstance(device, int):
        return True  # megatron passes torch.cuda.current_device() (an index)
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class CudaToCpu(TorchFunctionMode):
    """Rewrite ``device=cuda`` (or a CUDA index) to the CPU in every torch call it sees."""

    def __torch_function__(self, func: Callable, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_cuda(kwargs.get("device")):
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and _is_cuda_target(args, kwargs):
            return _to_cpu(args, kwargs)
        result = func(*args, **kwargs)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and "cuda" not in result:
            return result.replace("torch.", "torch.cuda.", 1)  # what megatron asserts on
        return result


def _is_cuda_target(args: tuple, kwargs: dict) -> bool:
    return any(_is_cuda(a) for a in args[1:2]) or _is_cuda(kwargs.get("device"))


def _to_cpu(args: tuple, kwargs: dict) -> torch.Tensor:
    rest = [a for a in args[1:] if not _is_cuda(a)]
    kwargs = {k: v for k, v in kwargs.items() if k != "device"}
    return args[0].to(*rest, **kwargs)


def enable() -> None:
    """Patch megatron-core's CUDA-only spots for this (CPU) process. Idempotent."""
    global _enabled
    if _enabled:
        return
    if torch.cuda.is_available():
        raise RuntimeError("megatron_cpu.enable() is for CPU runs; this process sees a GPU")
    from megatron.core.tensor_parallel import random as mp_random

    # The CPU itself, not an index: backward functions (sequence parallelism's reduce-scatter
    # and gathers) allocate with ``device=torch.cuda.current_device()`` on autograd's side,
    # where the CudaToCpu mode is not active.
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *args, **kwargs: None
    mp_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    _enabled = True


def seed_model_parallel_rng(seed: int, tp_rank: int) -> None:
    """CPU stand-in for ``model_parallel_cuda_manual_seed`` (which needs CUDA): the tracker's
    named states, seeded as megatron seeds them (TP ranks differ in the model-parallel one)."""
    from megatron.core.tensor_parallel import random as mp_random

    mp_random.initialize_rng_tracker(force_reset=True)
    tracker = mp_random.get_cuda_rng_tracker()
    tracker.reset()
    states = {
        "model-parallel-rng": seed + 2718 + tp_rank,
        "data-parallel-rng": seed,
        "expert-parallel-rng": seed + 1024 + tp_rank,
    }
    for name, value in states.items():
        tracker.states_[name] = torch.Generator().manual_seed(value).get_state()
        tracker.seeds_.add(value)
    tracker._is_initialized = True


def device_scope(device: str) -> AbstractContextManager:
    """The context the engine runs megatron calls in: the redirect on CPU, nothing on GPU."""
    return CudaToCpu() if device == "cpu" else nullcontext()
