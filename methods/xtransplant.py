"""XTransplant, the method: record one layer's feed-forward (or attention) output, transplant it.

docs/methods.md, "XTransplant specification". Run the auxiliary prompt (e.g. the English version of
the question) once and record, at every decoder layer, the output of the ``mlp`` (or
``self_attn``) module at the last prompt token. Run the main prompt; at target layer j, during
prefill only, replace that position's module output with the recorded output of source layer i.
Layers are 0-based indices into ``model.model.layers``; the module output is what the layer adds
to the residual stream, so the transplant swaps one layer's contribution and leaves the residual
path intact.

Mechanics. A forward hook on the module replaces ``output[b, positions[b]]`` (the first element
when the module returns a tuple, as ``self_attn`` does with sdpa and eager alike). The hook is
armed once per run and only fires on a call whose sequence length is the prompt's: the prefill.
Decode steps (length 1 with a KV cache) pass untouched, so later tokens see the transplant only
through the cached keys and values of the prompt, as in the method.

The search over (i, j) pairs, its Ray executor and the CLI are the application, in
``launcher/xtransplant*.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from model.layers import decoder_layers

Site = Literal["mlp", "attn"]
SITES: tuple[str, ...] = ("mlp", "attn")
_SITE_ATTR = {"mlp": "mlp", "attn": "self_attn"}


def site_module(model: nn.Module, layer: int, site: Site) -> nn.Module:
    if site not in _SITE_ATTR:
        raise ValueError(f"site must be one of {SITES}, got {site!r}")
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise ValueError(f"layer {layer} out of range: the model has layers 0..{len(layers) - 1}")
    return getattr(layers[layer], _SITE_ATTR[site])


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _with_hidden(output: Any, hidden: torch.Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def take_positions(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``[B, D]``: row b of ``hidden [B, T, D]`` at its position ``positions[b]`` (a copy)."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, positions.to(hidden.device)].detach().clone()


def put_positions(
    hidden: torch.Tensor, positions: torch.Tensor, vectors: torch.Tensor
) -> torch.Tensor:
    """``hidden [B, T, D]`` with row b's position ``positions[b]`` replaced by ``vectors[b]``
    (a new tensor; everything else unchanged)."""
    new = hidden.clone()
    rows = torch.arange(new.shape[0], device=new.device)
    new[rows, positions.to(new.device)] = vectors.to(device=new.device, dtype=new.dtype)
    return new


@torch.inference_mode()
def record_outputs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
    site: Site = "mlp",
) -> torch.Tensor:
    """``[B, L, D]``: every layer's ``site`` output at ``positions[b]`` of row b (one forward)."""
    layers = decoder_layers(model)
    captured: list[torch.Tensor | None] = [None] * len(layers)
    handles = []

    def make_hook(index: int):
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            captured[index] = take_positions(_hidden(output), positions)

        return hook

    for index in range(len(layers)):
        handles.append(site_module(model, index, site).register_forward_hook(make_hook(index)))
    try:
        device = next(model.parameters()).device
        decoder = model.model if hasattr(model, "model") else model
        decoder(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
    finally:
        for handle in handles:
            handle.remove()
    if any(c is None for c in captured):
        raise RuntimeError("a decoder layer did not run: cannot record every layer")
    return torch.stack([c for c in captured if c is not None], dim=1)


@dataclass
class TransplantHandle:
    """What the hook did: ``applied`` prefill replacements, ``passed`` calls left untouched."""

    calls: int = 0
    applied: int = 0
    passed: int = 0


@contextmanager
def transplant(
    model: nn.Module,
    target_layer: int,
    vectors: torch.Tensor,
    positions: torch.Tensor,
    *,
    site: Site = "mlp",
    prompt_len: int | None = None,
) -> Iterator[TransplantHandle]:
    """Replace ``site`` output of ``target_layer`` at ``positions[b]`` by ``vectors[b]``.

    Fires once, on the first call whose sequence length is ``prompt_len`` (any length when
    None): the prefill of a ``generate`` or the single forward of a scoring pass. Every other
    call (decode steps) passes through unchanged and is counted in the handle.
    """
    module = site_module(model, target_layer, site)
    if vectors.dim() != 2 or positions.dim() != 1 or vectors.shape[0] != positions.shape[0]:
        raise ValueError(
            f"need vectors [B, D] and positions [B], got {tuple(vectors.shape)}, "
            f"{tuple(positions.shape)}"
        )
    handle = TransplantHandle()
    armed = True

    def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
        nonlocal armed
        handle.calls += 1
        hidden = _hidden(output)
        if not armed or (prompt_len is not None and hidden.shape[1] != prompt_len):
            handle.passed += 1
            return None
        if hidden.shape[0] != vectors.shape[0]:
            raise ValueError(
                f"transplant batch mismatch: {vectors.shape[0]} vectors for a batch of "
                f"{hidden.shape[0]} rows"
            )
        armed = False
        handle.applied += 1
        return _with_hidden(output, put_positions(hidden, positions, vectors))

    registered = module.register_forward_hook(hook)
    try:
        yield handle
    finally:
        registered.remove()
