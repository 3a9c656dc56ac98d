"""Training methods behind one small interface, so the loop and the engines stay method-agnostic.

A method may inject modules into the backbone (before the engine wraps it), defines the loss of
a micro-batch, and owns state that travels with checkpoints and exports. On the megatron engine
a method runs as a `MegatronStage` per pipeline stage: the engine calls its hooks and never
names a method (methods/registry.py says which stage a method has).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

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


@dataclass(frozen=True)
class ExtraActivations:
    """Sequences a method runs through the lower decoder layers of each micro-batch besides the
    LM rows, whose activations wait for the backward: what the memory planner adds."""

    label: str
    sequences: int  # per micro-batch
    seq_len: int
    depth: int  # decoder layers (from the first) they pass through


@dataclass(frozen=True)
class StageContext:
    """Where a megatron pipeline stage sits: all a method's stage needs from the engine."""

    layers: range  # global 1-based decoder layer numbers this stage owns
    hidden_size: int
    dp_rank: int
    dp_size: int
    dp_group: Any
    pp_group: Any
    pp_size: int
    sequence_parallel: bool
    device: torch.device


# A forward-only pass of (input_ids, per-row context) through the pipeline, in eval mode.
StageForward = Callable[[Tensor, Tensor | None], None]


class MegatronStage:
    """A method's share of one megatron pipeline stage. This default is plain LM training
    (SFT): no layer of its own, no per-row context, no extra loss or state.

    Per-row context (``[rows, C]`` long, or None) rides with each micro-batch into megatron's
    TransformerBlock (``extra_block_kwargs``), so the method's layers read it and activation
    recomputation sees the same values.
    """

    def __init__(self, method: Method, where: StageContext) -> None:
        self.method, self.where = method, where

    # -- wiring ---------------------------------------------------------------------------

    def layer_class_for(self, number: int) -> type | None:
        """The layer class of global decoder layer `number` (None: megatron's own)."""
        return None

    def attach(self, model: nn.Module) -> None:
        """Link the stage's own layers (built through `layer_class_for`) to this stage."""

    # -- inputs ---------------------------------------------------------------------------

    def train_rows(self, batch: Batch, micro: int) -> tuple[Tensor, Tensor | None]:
        """(input_ids, context) of training micro-batch `micro`; extra rows go after the LM rows."""
        return batch.input_ids, None

    def side_rows(self, micro: int) -> tuple[Tensor, Tensor | None] | None:
        """(input_ids, context) of the method's own rows for training micro-batch `micro`, run
        as a micro-batch of their own right after it (at their own width, no LM loss), or
        None. Rows that leave the batch part-way then cost their own width, not the LM's."""
        return None

    def eval_context(self, batch: Batch) -> Tensor | None:
        """Context of an evaluation batch (the method's forward at inference)."""
        return None

    def block_context(self, context: Tensor) -> Tensor:
        """The rows of `context` whose activations reach this stage."""
        return context

    # -- the step -------------------------------------------------------------------------

    def begin_step(self, num_microbatches: int) -> None:
        """Before the first micro-batch of an optimizer step."""

    def lm_term(self, lm: Tensor) -> Tensor:
        """The LM loss as it enters the backward (a method's own terms attach in its layers)."""
        return lm

    def end_step(self) -> None:
        """After the optimizer step (a collective over the stage's groups, on every rank)."""

    def step_values(self) -> Tensor:
        """This rank's sums of the method's per-step scalars over the micro-batches; the same
        length on every rank (zeros for what another stage owns)."""
        return torch.zeros(0, dtype=torch.float64)

    def step_result(self, lm: float, values: Tensor) -> tuple[float, dict[str, float]]:
        """(total loss, metrics) from the mean LM loss and the reduced `step_values` means."""
        return lm, {"loss_lm": lm}

    # -- state ----------------------------------------------------------------------------

    def prepare(self, forward: StageForward, examples: Sequence[Example], batch_size: int) -> None:
        """The method's one-off work before the first step of a fresh run."""

    def sync_state(self) -> None:
        """Make `method.state_dict()` whole from every stage's part (a collective)."""

    def restore(self, state: dict[str, Any]) -> None:
        """Give the method (and this stage's share) back its checkpointed state."""
        self.method.load_state_dict(state)
