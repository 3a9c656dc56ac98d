"""Micro-batches through megatron-core's pipeline schedules, and what eval-mode passes record.

Logits stay split over the vocabulary (TP) unless a pass asks for them whole: the training
loss is megatron's vocab-parallel cross-entropy (`vocab_parallel_lm_loss`), so no rank ever
holds ``B x T x V`` for it; evaluation and generation gather only the logits they return.

One function runs a list of micro-batches through `get_forward_backward_func` (1F1B when PP > 1,
plain accumulation otherwise), forward-only or with the backward; the loss function decides what
each last-stage output becomes. The method's per-row context travels with each micro-batch into
the decoder block (see `MegatronStage` in methods/base.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor

from data.formatting import Batch
from methods.base import MegatronStage


@dataclass
class Feed:
    """One micro-batch as megatron sees it: ids and, for a method, per-row context."""

    input_ids: Tensor  # [rows, T]
    context: Tensor | None  # [rows, C] long (the method's per-row context) or None
    batch: Batch | None  # the LM rows (labels, normaliser); None for a method's own pass


LossFunc = Callable[[Feed, Tensor], tuple[Tensor, dict[str, Any]]]


def no_loss(feed: Feed, output: Tensor) -> tuple[Tensor, dict[str, Any]]:
    """For forward-only passes that only record (hooks, a method's statistics)."""
    return output.new_zeros(()), {}


@dataclass
class Pipeline:
    """The wrapped model chunk of this stage and what a pass needs around it."""

    model: Any  # megatron DistributedDataParallel
    stage: MegatronStage
    device: torch.device
    scope: Callable[[], AbstractContextManager]  # megatron_cpu.device_scope on CPU
    # Under sequence parallelism the TP ranks split the sequence evenly: every micro-batch is
    # right-padded to a multiple of TP (what runs past a row's length is padding everywhere).
    seq_multiple: int = 1

    def padded(self, ids: Tensor) -> Tensor:
        extra = -ids.shape[1] % self.seq_multiple
        return torch.nn.functional.pad(ids, (0, extra), value=0) if extra else ids

    def run(
        self,
        feeds: Sequence[Feed],
        *,
        forward_only: bool,
        loss_func: LossFunc,
        gather_logits: bool = False,
    ) -> list[Any]:
        """`loss_func` sees each TP rank's vocabulary slice of the logits ``[B, T, V/TP]``
        unless `gather_logits` (then the full ``[B, T, V]``)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def forward_step(data_iterator: Iterator[Feed], model):
            feed = next(data_iterator)
            ids = self.padded(feed.input_ids).to(self.device)
            positions = torch.arange(ids.shape[1], device=self.device).unsqueeze(0).expand_as(ids)
            extra = None
            if feed.context is not None:
                extra = {"context": self.stage.block_context(feed.context).to(self.device)}
            # No attention mask: rows are right-padded and attention is causal, so content
            # positions never see padding (padding positions are masked out of every loss).
            output = model(
                ids, positions, None, extra_block_kwargs=extra, runtime_gather_output=gather_logits
            )
            return output, partial(loss_func, feed)

        with self.scope():
            return get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=iter(feeds),
                model=[self.model],
                num_microbatches=len(feeds),
                seq_length=max(self.padded(f.input_ids).shape[1] for f in feeds),
                micro_batch_size=max(f.input_ids.shape[0] for f in feeds),
                forward_only=forward_only,
            )

    def forward_only(
        self, feed: Feed, loss_func: LossFunc = no_loss, gather_logits: bool = False
    ) -> list[Any]:
        """One eval-mode forward of `feed` (the model is back in train mode afterwards)."""
        self.model.eval()
        try:
            return self.run(
                [feed], forward_only=True, loss_func=loss_func, gather_logits=gather_logits
            )
        finally:
            self.model.train()


def record_layer_outputs(
    module: torch.nn.Module, num_layers: int, sequence_parallel: bool
) -> tuple[dict[int, Tensor], list[Any]]:
    """Forward hooks that record this stage's layer outputs ``[B, T, D]`` on the CPU, keyed as
    transformers numbers hidden states (0: embeddings; `num_layers`: after the final norm).
    Returns (the dict they fill, their handles)."""
    captured: dict[int, Tensor] = {}

    def record(index: int):
        def hook(_module, _args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if sequence_parallel:
                from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

                hidden = gather_from_sequence_parallel_region(hidden)
            captured[index] = hidden.transpose(0, 1).float().cpu()

        return hook

    modules = [(layer.layer_number, layer) for layer in module.decoder.layers]
    if module.pre_process:
        modules.insert(0, (0, module.embedding))
    if module.post_process:  # registered last: replaces layer L's entry with the normed one
        modules.append((num_layers, module.decoder.final_layernorm))
    return captured, [m.register_forward_hook(record(i)) for i, m in modules]


def vocab_parallel_lm_loss(logits: Tensor, batch: Batch, vocab: int) -> Tensor:
    """`methods.base.lm_loss` on this TP rank's vocabulary slice ``[B, W, V/TP]`` of the logits
    (W >= the label width: a method's extra rows or sequence-parallel padding may widen it).

    megatron-core's vocab-parallel cross-entropy reduces the softmax over the TP group; the
    rows that pad the vocabulary to a multiple of TP get -inf, so the softmax is the
    unpadded model's. Labels shift left instead of the logits (no copy of the logits)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from data.formatting import IGNORE_INDEX

    logits = logits.float()  # bf16: the fp32 copy the loss needs; fp32: the output itself
    part = logits.shape[-1]
    start = ps.get_tensor_model_parallel_rank() * part
    if start + part > vocab:  # the last rank's padding columns (the output is not reused)
        logits[..., max(0, vocab - start) :] = float("-inf")
    labels = batch.labels.to(logits.device)[:, 1:]
    targets = torch.full(logits.shape[:2], IGNORE_INDEX, dtype=labels.dtype, device=logits.device)
    targets[:, : labels.shape[1]] = labels
    token_loss = vocab_parallel_cross_entropy(logits, targets)
    return (token_loss * (targets != IGNORE_INDEX)).sum() / batch.token_normalizer
