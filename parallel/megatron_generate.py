"""Cached greedy generation on the megatron engine: prefill once, then one token per step.

Every pipeline stage keeps the keys and values of its own layers in a megatron-core
``StaticInferenceContext`` (one per decode, on every rank); each step is one forward-only pass
of the standard pipeline schedule over the new tokens only (``seq_length`` 1 after the
prefill), and the last stage's next-token logits are broadcast over the pipeline, as
``MegatronEngine.forward_logits`` does. ShifCon's layers shift every step's rows by their
language (their ``context`` rows ride along with each step), so prompt and generated tokens
are shifted alike, on whichever stage holds layers f and b.

Padding: prompts are left-padded so that every row writes the same cache slot per step. The
static context places rotary embeddings by cache slot, so a padded row's positions are offset
by its padding; rotary attention depends only on position differences, and an explicit mask
keeps padding out of every query's keys, so each row computes what a one-row forward does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from data.formatting import Batch
from parallel.engine import DecodeState


def prefill(engine: Any, batch: Batch, max_new_tokens: int) -> tuple[Tensor, DecodeState]:
    """Start a decode (a collective over the engine's ranks); see ``Engine.prefill``."""
    from megatron.core.inference.contexts import StaticInferenceContext

    rows, width = batch.input_ids.shape
    if engine.recipe.parallel.sequence_parallel:  # one new token cannot be split over TP ranks
        pairs = zip(batch.input_ids, batch.attention_mask, strict=True)
        seqs = [row[m.bool()].tolist() for row, m in pairs]
        state = DecodeState(batch.attention_mask.clone(), batch.lang_ids.clone(), Recompute(seqs))
        return state.cache.logits(engine, state.lang_ids), state
    cache = StaticInferenceContext(rows, width + max_new_tokens)
    state = DecodeState(batch.attention_mask.clone(), batch.lang_ids.clone(), cache)
    return _step(engine, state, batch.input_ids), state


def decode(engine: Any, state: DecodeState, tokens: Tensor) -> Tensor:
    """One token per row through every stage's cache; next-token logits ``[B, V]``."""
    state.grow()
    if isinstance(state.cache, Recompute):
        for seq, token in zip(state.cache.seqs, tokens.tolist(), strict=True):
            seq.append(token)
        return state.cache.logits(engine, state.lang_ids)
    return _step(engine, state, tokens.cpu().view(-1, 1))


class Recompute:
    """The cache's stand-in under sequence parallelism: each step is a full forward of the
    right-padded sequences (``forward_logits``), read at each row's last position."""

    def __init__(self, seqs: list[list[int]]) -> None:
        self.seqs = seqs

    def logits(self, engine: Any, lang_ids: Tensor) -> Tensor:
        width = max(len(seq) for seq in self.seqs)
        ids = torch.zeros(len(self.seqs), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, seq in enumerate(self.seqs):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        return engine.last_logits(Batch(ids, mask, ids, lang_ids))  # gathers only those rows


def attention_mask(mask: Tensor, width: int) -> Tensor:
    """``[B, 1, width, S]`` bool, True where a query must not look: future slots and padding.
    The queries are the last ``width`` of the ``S`` slots in the cache."""
    total = mask.shape[1]
    queries = torch.arange(total - width, total).unsqueeze(1)
    future = torch.arange(total).unsqueeze(0) > queries  # [width, S]
    return future.unsqueeze(0).unsqueeze(0) | (mask == 0)[:, None, None, :]


def _step(engine: Any, state: DecodeState, input_ids: Tensor) -> Tensor:
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    device = engine.ctx.torch_device
    rows, width = input_ids.shape
    cache = state.cache
    step_batch = Batch(input_ids, state.attention_mask, input_ids, state.lang_ids)
    context = engine.stage.eval_context(step_batch)  # the method's per-row context, if any
    captured: list[Tensor] = []

    def forward_step(data_iterator, model):
        ids = next(data_iterator).to(device)
        extra = None if context is None else {"context": context.to(device)}
        output = model(
            ids,
            state.positions(width).to(device),
            attention_mask(state.attention_mask, width).to(device),
            inference_context=cache,
            extra_block_kwargs=extra,
            runtime_gather_output=True,  # full-vocabulary logits of the last position
        )

        def keep(logits: Tensor):
            captured.append(logits[:, -1, : engine.shape.vocab].float())
            return logits.new_zeros(()), {}

        return output, keep

    # Only the last position's logits are returned: the output layer (and megatron's gather of
    # its vocabulary slices, which inference mode always does) sees only that position.
    module = engine.model.module
    hook = None
    if module.post_process:
        hook = module.output_layer.register_forward_pre_hook(
            lambda _layer, args: (args[0][-1:], *args[1:])
        )
    engine.model.eval()
    try:
        with engine.device_scope():
            get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=iter([input_ids]),
                model=[engine.model],
                num_microbatches=1,
                seq_length=width,
                micro_batch_size=rows,
                forward_only=True,
            )
    finally:
        engine.model.train()
        if hook is not None:
            hook.remove()
    cache.sequence_len_offset += width
    logits = captured[0] if captured else torch.empty(rows, engine.shape.vocab, device=device)
    if engine.pp > 1:
        dist.broadcast(
            logits,
            src=ps.get_pipeline_model_parallel_last_rank(),
            group=ps.get_pipeline_model_parallel_group(),
        )
    return logits
