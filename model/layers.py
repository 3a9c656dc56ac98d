"""Hugging Face decoder helpers every method shares: where the layers are, on which device,
and how to look at (or skip) some of them without changing the model."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn


def unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a DeepSpeed engine (or the model itself)."""
    return getattr(model, "module", model)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer stack of a Llama-family causal LM (Llama, Qwen2, Mistral, SmolLM)."""
    model = unwrap(model)
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None and hasattr(model, "get_decoder"):
        layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__}: no decoder layer stack at .model.layers")
    return layers


def device_of(model: nn.Module) -> torch.device:
    """Where the model's inputs belong (a DeepSpeed engine reports its own device)."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(unwrap(model).parameters()).device


def rank_world() -> tuple[int, int]:
    """This process's rank and the world size of the default group; (0, 1) when not distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


@contextmanager
def truncated(model: nn.Module, upto: int) -> Iterator[None]:
    """Run only decoder layers 1..upto: transformers loops over layers[:num_hidden_layers]."""
    config = model.config
    full = config.num_hidden_layers
    config.num_hidden_layers = upto
    try:
        yield
    finally:
        config.num_hidden_layers = full


@contextmanager
def capture_layers(model: nn.Module, layers: Sequence[int]) -> Iterator[dict[int, Tensor]]:
    """Temporarily record the output H_l of the given 1-based decoder layers on every forward.

    Hooks are registered on the unwrapped module, so they work under ZeRO-3 (they run after
    DeepSpeed's own gather hooks) and are removed on exit, leaving the model as it was.
    """
    stack = decoder_layers(model)
    store: dict[int, Tensor] = {}
    handles = []
    for layer in layers:

        def hook(module, args, output, layer=layer):
            store[layer] = output[0] if isinstance(output, tuple) else output

        handles.append(stack[layer - 1].register_forward_hook(hook))
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()
