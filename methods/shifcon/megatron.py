"""ShifCon inside megatron-core's partitioned decoder: layers that shift, capture and contrast.

The math is `methods/shifcon/math.py`, shared with the Hugging Face path; this file decides where
it runs when the decoder is split into tensor- and pipeline-parallel stages, behind the engine's
generic `MegatronStage` hooks (methods/base.py): the engine never reads ShifCon's config or state.

- Layers f..b are built as `ShifConLayer` through the layer spec (`layer_class_for`), on
  whichever stage owns them. With ``band: auto`` every layer is one: the layer probe
  (`methods/shifcon/probe.py`) runs through the built model in `prepare`, each stage summing
  its own layers' statistics, summed over DP then PP, and rank 0's band is every rank's; the
  layers outside the band then pass their output through.
- Every row of a micro-batch carries (role, language, pooled end, micro-batch index, pooled
  start) in the block's ``context`` input: megatron's TransformerBlock hands that tensor to
  every layer and into activation recomputation, and GPT layer specs have no cross-attention
  that would read it. The shift is therefore a pure function of the layer's
  inputs, and recomputation sees the same shift.
- The contrastive pairs of micro-batch i are a micro-batch of their own (role anchor/target,
  `side_rows`), right after LM micro-batch i in the same schedule, at the pairs' own width
  (padding them to the LM width cost 2.7x-4.2x in layers 1..b-1: docs/performance.md). Pair
  rows are never shifted and leave the batch after layer b-1 (after b in running mode): the
  layers above it run one placeholder row of the pairs' width (megatron's attention cannot
  take an empty batch; its loss is zero), and stages exchange the smaller activation
  (variable_seq_lengths).
- On each stage that owns band layers l in [f, b), the per-layer InfoNCE is attached to the
  layer output as an auxiliary loss (`AttachAuxLoss`, the pattern megatron-core uses for MoE
  load balancing): it enters that stage's backward pass with no change to the schedule.
- The linear language detector (`methods/shifcon/detect.py`) is fitted in `prepare` on the
  pooled H_f of the vector samples, summed from the stage that owns layer f over DP and PP,
  so every rank fits it on the DeepSpeed path's features, in the same order.
- A stage keeps language statistics only for its own layers. Sums are reduced over the
  data-parallel group; under sequence parallelism the rows are first gathered over the TP
  group, so TP ranks hold the same full-sequence statistics. The method's full statistics
  (what checkpoints, exports and metrics read) are gathered from the stages on demand.
- Running vectors move once per micro-batch, as on the DeepSpeed engine: micro-batch i's
  forward (shift and contrast) uses the statistics after micro-batches 0..i-1 (each one
  DP-reduced delta), also when activation recomputation re-runs it after later micro-batches
  (each forward's statistics are kept until its backward is surely done: at most PP + 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.transformer.transformer_layer import TransformerLayer
from torch import Tensor

from data.formatting import Batch, Example, collate, content_mask, right_pad
from methods.base import MegatronStage, StageContext, StageForward
from methods.shifcon.detect import LinearDetector
from methods.shifcon.math import (
    LanguageStats,
    all_reduce_,
    combine_losses,
    mcl_loss,
    pooled_mean,
    shift_backward,
    shift_toward,
)
from methods.shifcon.method import ShifCon, band_message, pad_pairs
from methods.shifcon.probe import ProbeResult, ProbeSums

# Row roles (context column 0). Vector samples (ROLE_PROBE) and layer-probe sequences
# (ROLE_LAYER_PROBE) carry their global sample / sequence index in column 3.
ROLE_LM, ROLE_ANCHOR, ROLE_TARGET, ROLE_PROBE, ROLE_LAYER_PROBE, ROLE_PAD = 0, 1, 2, 3, 4, 5
PAIR_ROLES = (ROLE_ANCHOR, ROLE_TARGET)


class AttachAuxLoss(torch.autograd.Function):
    """Identity on `hidden`; in backward, `aux` receives gradient 1 (it is already scaled)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, aux: Tensor) -> Tensor:
        ctx.save_for_backward(aux)
        return hidden

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
        (aux,) = ctx.saved_tensors
        return grad, torch.ones_like(aux)


class ShifConLayer(TransformerLayer):
    """A megatron TransformerLayer followed by this stage's ShifCon work for its layer number."""

    shifcon: ShifConStage | None = None

    def forward(self, *args, **kwargs):
        hidden, context = super().forward(*args, **kwargs)
        if self.shifcon is None or context is None:
            return hidden, context
        return self.shifcon.after_layer(self.layer_number, hidden, context)


def row_context(
    role: int, langs: Tensor, lengths: Tensor, micro: int, starts: Tensor | None = None
) -> Tensor:
    """``[rows, 5]`` long: (role, language id, pooled end, micro-batch index, pooled start).

    Pooled positions are [start, end) (`data.formatting.content_mask`, the one pooling
    definition); for LM rows the end is the row's length and the start is unused."""
    n = langs.shape[0]
    starts = torch.zeros(n) if starts is None else starts.cpu()
    columns = [torch.full((n,), role), langs.cpu(), lengths.cpu(), torch.full((n,), micro), starts]
    return torch.stack([c.long() for c in columns], dim=1)


def pooled_span(method: ShifCon, batch: Batch) -> tuple[Tensor, Tensor]:
    """(start, end) per row of the positions the method pools (ablation `pooling: all`: every
    non-padding position)."""
    lengths = batch.attention_mask.sum(1)
    if method.cfg.pooling == "all":
        return torch.zeros_like(lengths), lengths
    if batch.spans is None:
        return torch.ones_like(lengths), lengths
    return batch.spans[:, 0], torch.minimum(batch.spans[:, 1], lengths)


class ShifConStage(MegatronStage):
    """One pipeline stage's share of ShifCon: its layers' vectors, contrast and statistics."""

    method: ShifCon

    def __init__(self, method: ShifCon, where: StageContext) -> None:
        super().__init__(method, where)
        self.auto = method.band is None  # band: auto: chosen by the probe in `prepare`
        self.stage_layers = where.layers
        self.f = self.b = None
        self.own: list[int] = []
        self.drop_after = 0
        if not self.auto:
            self._take_band()
        self._probe_sums: ProbeSums | None = None  # filled by the layer probe's forwards
        self._features: Tensor | None = None  # detector features, filled by the vector pass
        self.hidden_size = where.hidden_size
        self.dp_group = where.dp_group
        self.sequence_parallel = where.sequence_parallel
        self.device = where.device
        self.running = method.cfg.vector_mode == "running"
        self.stats: LanguageStats | None = None
        self.deltas: dict[int, LanguageStats] = {}  # running: per micro-batch, not yet folded
        self._used: dict[int, LanguageStats] = {}  # running: what each micro-batch's forward uses
        self.micro_scale = 1.0
        self.mcl_values: dict[tuple[int, int], float] = {}
        self._counted: set[tuple[int, int]] = set()

    def _take_band(self) -> None:
        """This stage's share of the method's (now fixed) band."""
        m = self.method
        self.f, self.b = m.band
        self.own = [layer for layer in m.layers if layer in self.stage_layers]
        self.drop_after = m.capture_depth()

    def _set_band(self, band: Sequence[int]) -> None:
        """band: auto, once chosen (or restored): the method's band, then this stage's."""
        m = self.method
        m.band = (int(band[0]), int(band[1]))
        m.layers = list(range(m.band[0], m.band[1] + 1))
        self._take_band()

    # -- wiring ---------------------------------------------------------------------------

    def layer_class_for(self, number: int) -> type | None:
        """band: auto: every layer (the band is chosen after the model is built)."""
        return ShifConLayer if self.auto or number in self.method.layers else None

    def attach(self, model: torch.nn.Module) -> None:
        for module in model.modules():
            if isinstance(module, ShifConLayer):
                module.shifcon = self

    def block_context(self, context: Tensor) -> Tensor:
        """Pair rows have left the batch before a stage that starts above the drop layer."""
        if self.stage_layers.start > self.drop_after:
            return _rows_after_drop(context)[1]
        return context

    # -- inputs -----------------------------------------------------------------------------

    def lm_rows(self, batch: Batch, micro: int) -> Tensor:
        return row_context(ROLE_LM, batch.lang_ids, batch.attention_mask.sum(1), micro)

    def eval_context(self, batch: Batch) -> Tensor:
        return self.lm_rows(batch, 0)

    def train_rows(self, batch: Batch, micro: int) -> tuple[Tensor, Tensor]:
        return batch.input_ids, self.lm_rows(batch, micro)

    def side_rows(self, micro: int) -> tuple[Tensor, Tensor]:
        """Micro-batch `micro`'s 2n contrastive rows (n English, n targets), at their width."""
        m = self.method
        pairs = m.next_pairs(self.where.dp_rank, self.where.dp_size)
        pair_batch, pair_langs = pad_pairs(
            pairs, m.tokenizer, m.cfg.pairs.max_length, m.lang_index, m.dominant
        )
        n = len(pairs)
        starts, ends = pooled_span(m, pair_batch)
        context = torch.cat(
            [
                row_context(ROLE_ANCHOR, pair_langs[:n], ends[:n], micro, starts[:n]),
                row_context(ROLE_TARGET, pair_langs[n:], ends[n:], micro, starts[n:]),
            ]
        )
        return pair_batch.input_ids, context

    # -- the layer hook ---------------------------------------------------------------------

    def after_layer(self, number: int, hidden: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        """hidden ``[s, rows, h]`` (``[s/tp, rows, h]`` under sequence parallelism)."""
        roles, langs = context[:, 0], context[:, 1]
        if bool((roles == ROLE_LAYER_PROBE).any()):
            self._probe_layer(number, hidden, context)
            return hidden, context
        if self.f is None or not self.f <= number <= self.b:  # band: auto, outside the band
            return hidden, context
        stats = self._stats_for(context)
        if number in self.own:
            self._statistics(number, hidden, context)
        if self.f <= number < self.b and bool((roles == ROLE_ANCHOR).any()):
            hidden = self._contrast(number, hidden, context, stats)
        if number in (self.f, self.b) and bool((roles == ROLE_LM).any()):
            ids = torch.where(roles == ROLE_LM, langs, torch.full_like(langs, self.method.dominant))
            hidden = self._shift(number, hidden, ids, stats)
        if number == self.drop_after and bool(_is_pair(roles).any()):
            keep, context = _rows_after_drop(context)
            hidden = hidden[:, keep].contiguous()
        return hidden, context

    def _stats_for(self, context: Tensor) -> LanguageStats | None:
        """The statistics this forward uses: running vectors as they stood after the
        micro-batches before this one (see the module docstring), for micro-batch i's LM rows
        and its pair rows alike."""
        if not (self.running and torch.is_grad_enabled() and context.shape[0] > 0):
            return self.stats
        micro = int(context[0, 3])
        if micro not in self._used:  # this micro-batch's first forward on this stage
            for done in sorted(m for m in self.deltas if m < micro):
                self.stats.add_(all_reduce_(self.deltas.pop(done), self.dp_group))
            for old in [m for m in self._used if m < micro - self.where.pp_size]:
                del self._used[old]  # 1F1B: its backward (and any recomputation) is done
            self._used[micro] = LanguageStats(
                list(self.stats.languages),
                list(self.stats.layers),
                self.stats.sums.clone(),
                self.stats.counts.clone(),
            )
        return self._used[micro]

    def _shift(self, number: int, hidden: Tensor, lang_ids: Tensor, stats: LanguageStats) -> Tensor:
        shift = shift_toward if number == self.f else shift_backward
        vectors = stats.layer_means(number).float().to(hidden.device)
        shifted = shift(hidden.transpose(0, 1), lang_ids, vectors, self.method.dominant)
        return shifted.transpose(0, 1).contiguous()

    def _full_rows(self, hidden: Tensor, rows: Tensor) -> Tensor:
        """``[n, s, h]`` of the chosen rows, the whole sequence even under sequence parallelism.

        Every TP rank then repeats the same computation on the gathered rows, so the backward
        of the gather hands each rank its own slice of the gradient
        (``tensor_parallel_output_grad=False``); the default reduce-scatter would sum TP
        identical copies and make the contrastive gradient TP times too large."""
        picked = hidden[:, rows]
        if self.sequence_parallel:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            picked = gather_from_sequence_parallel_region(picked, tensor_parallel_output_grad=False)
        return picked.transpose(0, 1)

    def _statistics(self, number: int, hidden: Tensor, context: Tensor) -> None:
        roles = context[:, 0]
        probe = roles == ROLE_PROBE
        running = self.running and torch.is_grad_enabled()
        if bool(probe.any()):
            target, rows = self.stats, probe
        elif running and bool(_is_pair(roles).any()):
            key = (int(context[0, 3]), number)
            if key in self._counted:  # activation recomputation runs the layer again
                return
            self._counted.add(key)
            if key[0] not in self.deltas:
                self.deltas[key[0]] = self.stats.zeros_like()
            target, rows = self.deltas[key[0]], _is_pair(roles)
        else:
            return
        with torch.no_grad():
            h = self._full_rows(hidden.detach(), rows)
            langs = torch.where(
                roles[rows] == ROLE_ANCHOR,
                torch.full_like(context[rows, 1], self.method.dominant),
                context[rows, 1],
            )
            mask = _content_mask(context[rows], h.shape[1])
            target.update(number, h, mask, langs)
            if number == self.f and self._features is not None and target is self.stats:
                self._features[context[rows, 3]] = pooled_mean(h, mask).to(self._features)

    def _probe_layer(self, number: int, hidden: Tensor, context: Tensor) -> None:
        """The layer probe's sums for this layer (unshifted: no band exists yet)."""
        rows = context[:, 0] == ROLE_LAYER_PROBE
        with torch.no_grad():
            h = self._full_rows(hidden.detach(), rows)
            picked = context[rows]
            self._probe_sums.add(number, picked[:, 3], h, _content_mask(picked, h.shape[1]))

    def _contrast(
        self, number: int, hidden: Tensor, context: Tensor, stats: LanguageStats
    ) -> Tensor:
        roles = context[:, 0]
        anchors, targets = roles == ROLE_ANCHOR, roles == ROLE_TARGET
        h_en, h_x = self._full_rows(hidden, anchors), self._full_rows(hidden, targets)
        means = stats.means()
        pos = stats.layer_index(number)
        loss, _ = mcl_loss(
            [h_en],
            [h_x],
            _content_mask(context[anchors], h_en.shape[1]),
            _content_mask(context[targets], h_x.shape[1]),
            context[targets, 1],
            means[self.method.dominant, pos : pos + 1].float(),
            means[:, pos : pos + 1].float(),
            tau=self.method.cfg.tau,
            centres=None if self.method.cfg.pooling == "all" else means[:, pos : pos + 1].float(),
            dominant=self.method.dominant,
        )
        self.mcl_values[(int(context[0, 3]), number)] = float(loss.detach())
        if not torch.is_grad_enabled():
            return hidden
        scale = self.method.cfg.beta / (self.b - self.f) * self.micro_scale
        return AttachAuxLoss.apply(hidden, loss * scale)

    # -- vectors ----------------------------------------------------------------------------

    def empty_stats(self) -> LanguageStats | None:
        if not self.own:
            return None
        return LanguageStats.zeros(
            self.method.languages, self.own, self.hidden_size, device=self.device
        )

    def probe_rows(
        self, examples: Sequence[Example], pad_id: int, first: int = 0
    ) -> tuple[Tensor, Tensor]:
        """Vector samples `first`, `first` + 1, ... (their index in column 3)."""
        batch = collate(examples, pad_id, self.method.languages)
        starts, ends = pooled_span(self.method, batch)
        context = row_context(ROLE_PROBE, batch.lang_ids, ends, 0, starts)
        context[:, 3] = torch.arange(first, first + len(examples))
        return batch.input_ids, context

    def prepare(self, forward: StageForward, examples: Sequence[Example], batch_size: int) -> None:
        """band: auto: the layer probe first. Precompute: the vector samples through the frozen
        model, unshifted, each DP rank a share; every stage records its own layers; one
        all-reduce per stage. The language detector is fitted on the same forwards."""
        if self.auto and self.method.band is None:
            self._choose_band(forward, examples, batch_size)
        batches = self.method.vector_batches(examples, batch_size)
        pad = self.method.tokenizer.pad_token_id
        self.stats = self.empty_stats()
        firsts = [0]
        for group in batches:
            firsts.append(firsts[-1] + len(group))
        self._features = torch.zeros(firsts[-1], self.hidden_size, device=self.device)
        w = self.where
        for i in range(w.dp_rank, len(batches), w.dp_size):
            forward(*self.probe_rows(batches[i], pad, firsts[i]))
        if self.stats is not None:
            all_reduce_(self.stats, self.dp_group)
        self._fit_detector([ex for group in batches for ex in group])
        self.sync_state()

    def _sum_over_stages(self, tensor: Tensor) -> Tensor:
        """Each entry written by one (DP rank, stage) of this TP rank's pipeline: the whole."""
        dist.all_reduce(tensor, group=self.dp_group)
        dist.all_reduce(tensor, group=self.where.pp_group)
        return tensor

    def _fit_detector(self, samples: Sequence[Example]) -> None:
        """The `linear` detector on the pooled H_f of every vector sample, in sample order
        (the order a one-process DeepSpeed run fits on), on every rank."""
        feats, self._features = self._sum_over_stages(self._features), None
        labels = torch.tensor([self.method.lang_index[ex.lang] for ex in samples])
        self.method.detector = LinearDetector.fit(feats.cpu(), labels, len(self.method.languages))

    def _choose_band(
        self, forward: StageForward, examples: Sequence[Example], batch_size: int
    ) -> None:
        """band: auto: the layer probe through the pipeline (each DP rank a share of the
        batches, each stage its own layers), summed over DP then PP; rank 0's result is every
        rank's (one decision, whatever the round-off)."""
        m = self.method
        inputs = m.probe_inputs(examples)
        total = torch.tensor([self.stage_layers.stop - 1], device=self.device)
        dist.all_reduce(total, op=dist.ReduceOp.MAX, group=self.where.pp_group)
        sums = ProbeSums(inputs, int(total), self.hidden_size, self.device)
        self._probe_sums = sums
        w = self.where
        try:
            for idx in sums.batches(batch_size)[w.dp_rank :: w.dp_size]:
                forward(*self._layer_probe_rows(inputs, idx))
        finally:
            self._probe_sums = None
        sums.all_reduce_(self.dp_group).all_reduce_(self.where.pp_group)
        chosen: list[ProbeResult | None] = [sums.result(m.cfg.probe_tolerance)]
        dist.broadcast_object_list(chosen, src=0)
        m.probe_result = chosen[0]
        self._set_band(m.probe_result.band)
        if dist.get_rank() == 0:
            print(band_message(m.probe_result))

    def _layer_probe_rows(self, inputs, idx: Sequence[int]) -> tuple[Tensor, Tensor]:
        """Probe sequences `idx`, right-padded; context: (role, -1 (`ProbeSums` knows each
        sequence's language), pooled end, sequence index, pooled start)."""
        ids, _ = right_pad([inputs.sequences[i] for i in idx], 0)
        spans = torch.tensor([inputs.spans[i] for i in idx], dtype=torch.long)
        n = len(idx)
        columns = [
            torch.full((n,), ROLE_LAYER_PROBE),
            torch.full((n,), -1),
            spans[:, 1],
            torch.tensor(list(idx)),
            spans[:, 0],
        ]
        return ids, torch.stack([c.long() for c in columns], dim=1)

    # -- the step ---------------------------------------------------------------------------

    def begin_step(self, num_microbatches: int) -> None:
        self.micro_scale = 1.0 / num_microbatches
        self.mcl_values.clear()
        self._counted.clear()
        self.deltas.clear()
        self._used.clear()

    def lm_term(self, lm: Tensor) -> Tensor:
        """alpha * LM; the beta * MCL terms enter the backward in the band layers."""
        return combine_losses(lm, None, self.method.cfg.alpha, self.method.cfg.beta)

    def end_step(self) -> None:
        """Running vectors: the micro-batches not folded yet (one fused all-reduce over DP
        each, in order), then the method's full statistics from every stage."""
        for micro in sorted(self.deltas):
            self.stats.add_(all_reduce_(self.deltas.pop(micro), self.dp_group))
        self._used.clear()
        if self.running:
            self.sync_state()

    def step_values(self) -> Tensor:
        """Per band layer, this rank's MCL summed over the micro-batches (0: another stage's)."""
        band = list(range(self.f, self.b))
        values = torch.zeros(len(band), dtype=torch.float64)
        for (_, layer), value in self.mcl_values.items():
            values[band.index(layer)] += value
        return values

    def step_result(self, lm: float, values: Tensor) -> tuple[float, dict[str, float]]:
        cfg = self.method.cfg
        mcl = values.mean().item()
        metrics = {"loss_lm": lm, "loss_mcl": mcl}
        metrics.update({f"loss_mcl/L{self.f + j}": v.item() for j, v in enumerate(values)})
        return combine_losses(lm, mcl, cfg.alpha, cfg.beta), metrics

    # -- state ------------------------------------------------------------------------------

    def sync_state(self) -> None:
        """The method's full statistics (every band layer) from the stages that own them."""
        mine = self.stats.state_dict() if self.stats is not None else None
        parts: list[Any] = [None] * self.where.pp_size
        dist.all_gather_object(parts, mine, group=self.where.pp_group)
        self.method.stats = merge_stage_stats(parts, self.method.languages)

    def restore(self, state: dict[str, Any]) -> None:
        if self.method.band is None and state.get("band") is not None:  # band: auto
            self._set_band(state["band"])
        self.method.load_state_dict(state)
        if self.method.stats is not None:
            self.take_stats(self.method.stats)

    def take_stats(self, full: LanguageStats) -> None:
        """This stage's rows of the full (every band layer) statistics."""
        if not self.own:
            self.stats = None
            return
        rows = [full.layer_index(layer) for layer in self.own]
        self.stats = LanguageStats(
            list(full.languages),
            list(self.own),
            full.sums[:, rows].to(self.device).clone(),
            full.counts[:, rows].to(self.device).clone(),
        )


def merge_stage_stats(parts: Sequence[dict | None], languages: Sequence[str]) -> LanguageStats:
    """The full statistics from every stage's `state_dict()` (None: a stage without band layers)."""
    found = [LanguageStats.from_state_dict(p) for p in parts if p is not None]
    layers = sorted({layer for s in found for layer in s.layers})
    hidden = found[0].hidden_size
    full = LanguageStats.zeros(languages, layers, hidden)
    for s in found:
        for layer in s.layers:
            src, dst = s.layer_index(layer), full.layer_index(layer)
            full.sums[:, dst] = s.sums[:, src]
            full.counts[:, dst] = s.counts[:, src]
    return full


def _is_pair(roles: Tensor) -> Tensor:
    return (roles == ROLE_ANCHOR) | (roles == ROLE_TARGET)


def _rows_after_drop(context: Tensor) -> tuple[Tensor, Tensor]:
    """(which rows, their context) above the drop layer. A micro-batch of pair rows only keeps
    its first row as a placeholder (ROLE_PAD: no layer reads it, its loss is zero), since
    megatron's attention cannot take an empty batch."""
    keep = ~_is_pair(context[:, 0])
    if bool(keep.any()):
        return keep, context[keep]
    keep[0] = True
    kept = context[keep].clone()
    kept[:, 0] = ROLE_PAD
    return keep, kept


def _content_mask(context: Tensor, width: int) -> Tensor:
    """The pooled positions of these rows: [start, end) from columns 4 and 2 of the context,
    through the shared definition (which never pools position 0 unless asked for `all`)."""
    ends, starts = context[:, 2], context[:, 4]
    pos = torch.arange(width, device=context.device).unsqueeze(0)
    if bool((starts == 0).all()):  # pooling: all (ablation): every non-padding position
        return (pos < ends.unsqueeze(1)).long()
    return content_mask((pos < ends.unsqueeze(1)).long(), starts, ends)
