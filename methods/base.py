"""Training methods behind one small interface, so the loop and the engines stay method-agnostic.

A method may inject modules into the backbone (before the engine wraps it), defines the loss of
a micro-batch, and owns state that travels with checkpoints and exports.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from data.formatting import Batch, Example
from model.losses import per_sample_lm_loss


class Method:
    name = "base"

    def attach(self, model: nn.Module) -> None:
        """Inject layers or hooks into the (possibly partitioned) backbone."""

    def prepare(self, model: nn.Module, examples: Sequence[Example], batch_size: int) -> None:
        """One-off work on the wrapped model before the first step of a fresh run."""

    def logits(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The method's forward (training, evaluation and export parity use the same one)."""
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        loss = lm_loss(self.logits(model, batch), batch)
        return loss, {"loss_lm": loss.item()}

    def run_tags(self) -> dict[str, str]:
        """Decisions the method took at start-up (e.g. a probed band), logged once per run."""
        return {}

    def metrics(self) -> dict[str, float]:
        """Method-specific values worth tracking at evaluation time."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""

    def export(self, directory: Path) -> None:
        """Write the files that must travel with an exported model."""

    def artifacts(self, export_dir: Path) -> list[Path]:
        """The method's own files in an export, logged to MLflow on their own as well."""
        return []


class SFT(Method):
    """Supervised fine-tuning: next-token loss on the response tokens."""

    name = "sft"


def lm_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """The micro-batch's share of the global batch's token-mean LM loss."""
    token_sum, _ = per_sample_lm_loss(logits, batch.labels)
    return token_sum.sum() / batch.token_normalizer
