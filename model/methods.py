"""Training methods behind one small interface, so the loop and the engines stay method-agnostic.

A method may inject modules into the backbone (before the engine wraps it), defines the loss of
a micro-batch, and owns state that travels with checkpoints and exports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from data.formatting import Batch
from model.losses import per_sample_lm_loss


class Method:
    name = "base"

    def attach(self, model: nn.Module) -> None:
        """Inject layers or hooks into the (possibly partitioned) backbone."""

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""

    def export(self, directory: Path) -> None:
        """Write the files that must travel with an exported model."""


class SFT(Method):
    """Supervised fine-tuning: next-token loss on the response tokens."""

    name = "sft"

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        loss = lm_loss(logits, batch)
        return loss, {"loss_lm": loss.item()}


def lm_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """The micro-batch's share of the global batch's token-mean LM loss."""
    token_sum, _ = per_sample_lm_loss(logits, batch.labels)
    return token_sum.sum() / batch.token_normalizer


def build_method(recipe, languages: list[str]) -> Method:
    if recipe.method.name == "sft":
        return SFT()
    raise ValueError(f"method.name: no implementation for {recipe.method.name!r}")
