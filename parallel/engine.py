"""The engine interface: the only thing the training loop knows about parallelism.

An engine owns the (partitioned) model and its optimizer. It decides where layers live and
which process group reduces what; the method decides what the loss is.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from data.formatting import IGNORE_INDEX, Batch, Example
from methods.base import Method
from model.losses import per_sample_lm_loss
from parallel.distributed import DistContext


@dataclass
class DecodeState:
    """A cached greedy decode between steps: the rows' mask so far and the engine's cache.

    Prompts are left-padded (content on the right), so every row's next token goes to the
    same cache slot; ``attention_mask`` (``[B, T]``, 1 on content) keeps padding out of every
    step's attention, and positions count content tokens only, so a row sees the positions
    0..n-1 it has in a one-row forward.
    """

    attention_mask: torch.Tensor
    lang_ids: torch.Tensor
    cache: Any = None
    steps: int = 0  # decode steps run so far
    held: ExitStack = field(default_factory=ExitStack)  # what the engine holds until the end
    module: Any = None  # what the HF decode runs (default: the engine's forward module)

    def positions(self, width: int) -> torch.Tensor:
        """``[B, width]`` position ids of the last ``width`` slots (content tokens counted)."""
        return (self.attention_mask.cumsum(dim=1) - 1).clamp(min=0)[:, -width:]

    def grow(self) -> None:
        """One more content slot per row (the token this step feeds)."""
        ones = self.attention_mask.new_ones(self.attention_mask.shape[0], 1)
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=1)
        self.steps += 1


@dataclass
class StepResult:
    loss: float  # mean over the micro-batches and the data-parallel group
    grad_norm: float | None
    metrics: dict[str, float] = field(default_factory=dict)


class Engine(ABC):
    ctx: DistContext
    method: Method
    config: dict[str, Any]  # the engine's own resolved config, logged as an artifact

    @property
    @abstractmethod
    def forward_module(self) -> torch.nn.Module:
        """The callable that runs the wrapped model (what methods call in `loss`/`prepare`)."""

    @property
    def dp_rank(self) -> int:
        return self.ctx.rank

    @property
    def dp_size(self) -> int:
        return self.ctx.world_size

    @abstractmethod
    def train_step(self, micro_batches: Sequence[Batch], lr: float) -> StepResult:
        """Forward/backward over the micro-batches (gradient accumulation), then one update."""

    @abstractmethod
    def forward_logits(self, batch: Batch) -> torch.Tensor:
        """Eval-mode logits [B, T, V]; a collective: every rank calls it equally often."""

    def eval_losses(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample summed LM loss and token count."""
        return per_sample_lm_loss(
            self.forward_logits(batch), batch.labels.to(self.ctx.torch_device)
        )

    @torch.no_grad()
    def hidden_states(self, batch: Batch) -> Sequence[torch.Tensor]:
        """Eval-mode output of every layer, ``[B, T, D]`` each (0: embeddings, L: after the
        final norm, as transformers reports them), through the method's forward (so a method's
        shift shows); a collective like `forward_logits`. Default: the HF forward module's
        ``output_hidden_states``; a TypeError says the module has no such argument."""
        module, kept = self.forward_module, []

        def forward(*args: Any, **kwargs: Any) -> Any:
            kept.append(module(*args, output_hidden_states=True, **kwargs))
            return kept[-1]

        was_training = module.training
        module.eval()
        try:
            self.method.logits(forward, batch.to(self.ctx.torch_device))
        finally:
            module.train(was_training)
        return getattr(kept[-1], "hidden_states", None) or ()

    # -- cached greedy generation ------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, batch: Batch, max_new_tokens: int) -> tuple[torch.Tensor, DecodeState]:
        """Start a cached greedy decode of left-padded prompts (``batch.attention_mask`` 1 on
        content, content on the right; ``batch.lang_ids`` per row, so the method's forward
        shifts as in training). Returns each row's next-token logits ``[B, V]`` and the state
        `decode` continues from. A collective like `forward_logits`.

        Default: the Hugging Face forward module with a ``DynamicCache``, through the method's
        forward (``Method.logits``), so ShifCon's shift is on for the prompt and every
        generated token (its hooks shift each call's new positions)."""
        return self._hf_prefill(batch, self.forward_module)

    def _hf_prefill(
        self, batch: Batch, module: torch.nn.Module, held: ExitStack | None = None
    ) -> tuple[torch.Tensor, DecodeState]:
        """`prefill` through ``module``; ``held`` (released by `end_decode`) is what the
        engine keeps for this decode, e.g. gathered weights."""
        from transformers import DynamicCache

        device = self.ctx.torch_device
        state = DecodeState(
            batch.attention_mask.to(device),
            batch.lang_ids.to(device),
            DynamicCache(),
            module=module,
        )
        if held is not None:
            state.held.enter_context(held)
        try:
            return self._cached_forward(state, batch.input_ids.to(device)), state
        except BaseException:
            state.held.close()
            raise

    @torch.no_grad()
    def decode(self, state: DecodeState, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (``[B]``) through the cache; next-token logits ``[B, V]``."""
        state.grow()
        return self._cached_forward(state, tokens.to(self.ctx.torch_device).view(-1, 1))

    def end_decode(self, state: DecodeState) -> None:
        """The decode is over: release what the engine held for it (every rank calls it)."""
        state.held.close()
        state.cache = None

    def _cached_forward(self, state: DecodeState, input_ids: torch.Tensor) -> torch.Tensor:
        module = state.module if state.module is not None else self.forward_module
        extra = {
            "cache": state.cache,
            "use_cache": True,
            "position_ids": state.positions(input_ids.shape[1]),
            "logits_to_keep": 1,
        }

        def forward(*args: Any, **kwargs: Any) -> Any:
            return module(*args, **kwargs, **extra)

        # No labels: every position fed here is context (prompt or generated), so a method that
        # shifts prompt positions only (ShifCon `shift_positions: prompt`) sees the prefill as
        # prompt and tells generated tokens by the cache they continue.
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        batch = Batch(input_ids, state.attention_mask, labels, state.lang_ids)
        was_training = module.training
        module.eval()
        try:
            logits = self.method.logits(forward, batch)
        finally:
            module.train(was_training)
        return logits[:, -1].float()

    def prepare_method(self, examples: Sequence[Example], batch_size: int) -> None:
        """The method's one-off work before the first step of a fresh run (e.g. vectors)."""
        self.method.prepare(self.forward_module, examples, batch_size)

    def restore_method(self, state: dict[str, Any]) -> None:
        """Give the method back the state it had at the checkpoint."""
        self.method.load_state_dict(state)

    def method_state(self) -> dict[str, Any]:
        """The method's state for a checkpoint (a collective where the engine must gather it)."""
        return self.method.state_dict()

    @abstractmethod
    def param_counts(self) -> tuple[int, int]:
        """(elements this rank stores, elements of the full model): shows the partitioning."""

    @abstractmethod
    def save(self, root: Path, tag: str, client_state: dict[str, Any]) -> None:
        """Write checkpoint `root/tag` (all ranks)."""

    @abstractmethod
    def load(self, root: Path, tag: str) -> dict[str, Any]:
        """Load checkpoint `root/tag`, returning the client state saved with it."""

    @abstractmethod
    def export(self, directory: Path) -> None:
        """A Hugging Face directory (safetensors, config) of the current weights (rank 0 writes)."""
