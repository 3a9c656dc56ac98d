"""Lens inside megatron-core's partitioned decoder: the Lens terms on the top layer's output.

The math is `methods/lens.py` (`pool`, `lens_terms`, `combine`), shared with the Hugging Face
path; this file decides where it runs when the decoder is split into tensor- and
pipeline-parallel stages, behind the engine's generic `MegatronStage` hooks (methods/base.py).

- `attach` freezes every parameter but those of the top k decoder layers, on whichever stages
  own them (before the engine wraps the model: megatron's DDP and optimizer take only trainable
  parameters; a stage with none still joins the gradient-norm reductions, and megatron skips the
  backward of an output that needs no gradient).
- The parallel prompts of each micro-batch run as a micro-batch of their own right after it
  (`side_rows`: at their own width, with no LM loss): every row carries (role, language,
  length, micro-batch index, prompt index) in the block's ``context`` input, which megatron's
  TransformerBlock hands to every layer. A forward hook on layer L (the last stage) pools the
  prompt rows, computes the Lens terms against theta_0's pooled states (the method's reference
  table, filled by `prepare`), attaches them to the layer output as an auxiliary loss
  (`AttachAuxLoss`, as the ShifCon stage does) and drops the prompt rows but one placeholder:
  the final norm and the LM head do no work for them. The trained layers may sit on several
  stages: the auxiliary loss's gradient crosses the pipeline like the LM loss's.
- The LM micro-batches still run (the loop's batches); with lm_weight 0 their loss enters the
  backward multiplied by 0, as on DeepSpeed where it is not computed at all.
- Under sequence parallelism the prompt rows are gathered over the TP group before pooling.
- The method's state (reference table, directions) is computed on the last stage and
  broadcast over the pipeline group once; it does not change during training.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from data.formatting import Example, right_pad
from methods.base import MegatronStage, StageContext, StageForward
from methods.lens import TERMS, Lens, combine, lens_terms
from methods.shifcon.math import pooled_mean
from methods.shifcon.megatron import AttachAuxLoss

ROLE_LM, ROLE_EN, ROLE_TARGET, ROLE_PROBE = 0, 1, 2, 3


def row_context(
    roles: Tensor, langs: Tensor, lengths: Tensor, micro: int, prompts: Tensor
) -> Tensor:
    """``[rows, 5]`` long: (role, language id, length, micro-batch index, prompt index)."""
    micros = torch.full_like(roles, micro)
    columns = [roles, langs, lengths, micros, prompts]
    return torch.stack([c.cpu().long() for c in columns], dim=1)


class LensStage(MegatronStage):
    """One pipeline stage's share of Lens: its trainable layers, and on the last stage the
    Lens terms."""

    method: Lens

    def __init__(self, method: Lens, where: StageContext) -> None:
        super().__init__(method, where)
        self.micro_scale = 1.0
        self.values: dict[int, Tensor] = {}  # micro-batch -> (retain, push, pull)
        self.pooled: dict[int, Tensor] = {}  # prepare: prompt index -> pooled top-layer state
        self.top = False  # whether this stage owns layer L

    # -- wiring ---------------------------------------------------------------------------

    def attach(self, model: torch.nn.Module) -> None:
        trained = self.method.set_depth(model.config.num_layers)
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in model.decoder.layers:
            if layer.layer_number in trained:
                for p in layer.parameters():
                    p.requires_grad_(True)
            if layer.layer_number == trained.stop - 1:
                layer.register_forward_hook(self._after_top)
                self.top = True

    # -- inputs ---------------------------------------------------------------------------

    def _prompt_rows(self, prompts: Sequence[int], roles: Tensor, micro: int):
        """(ids, context) of prompt rows (indices into the method's prompt table)."""
        m = self.method
        ids, mask = right_pad([m.prompt_ids(i) for i in prompts], m.tokenizer.pad_token_id)
        langs = torch.tensor([m.prompt_langs[i] for i in prompts], dtype=torch.long)
        index = torch.tensor(list(prompts), dtype=torch.long)
        return ids, row_context(roles, langs, mask.sum(1), micro, index)

    def side_rows(self, micro: int) -> tuple[Tensor, Tensor]:
        """n English prompts and their n targets, a micro-batch of their own at their own width
        (the LM micro-batch keeps its rows and width)."""
        m = self.method
        prompts, _ = m.pair_rows(m.pair_batch(self.where.dp_rank, self.where.dp_size))
        n = len(prompts) // 2
        roles = torch.tensor([ROLE_EN] * n + [ROLE_TARGET] * n)
        return self._prompt_rows(prompts, roles, micro)

    # -- the top layer ----------------------------------------------------------------------

    def _full_rows(self, hidden: Tensor, rows: Tensor) -> Tensor:
        """``[n, s, h]`` of the chosen rows, the whole sequence under sequence parallelism (each
        TP rank repeats the same computation: its backward hands back this rank's slice)."""
        picked = hidden[:, rows]
        if self.where.sequence_parallel:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            picked = gather_from_sequence_parallel_region(picked, tensor_parallel_output_grad=False)
        return picked.transpose(0, 1)

    def _pooled(self, hidden: Tensor, context: Tensor, rows: Tensor) -> Tensor:
        h = self._full_rows(hidden, rows)
        positions = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
        return pooled_mean(h, positions < context[rows, 2].to(h.device).unsqueeze(1))

    def _after_top(self, module, args, output):
        """Layer L's output ``(hidden [s, rows, h], context)``: record (prepare) or add the
        Lens terms and drop the prompt rows (training)."""
        hidden, context = output
        if context is None:
            return output
        roles = context[:, 0]
        probe = roles == ROLE_PROBE
        if bool(probe.any()):
            with torch.no_grad():
                h = self._pooled(hidden.detach(), context, probe)
            for index, row in zip(context[probe, 4].tolist(), h, strict=True):
                self.pooled[index] = row.cpu()
            return output
        prompts = (roles == ROLE_EN) | (roles == ROLE_TARGET)
        if not bool(prompts.any()):
            return output
        m = self.method
        h = self._pooled(hidden, context, prompts)
        h0 = m.reference[context[prompts, 4].cpu()].to(h.device)
        n = int((roles == ROLE_EN).sum())
        langs = context[roles == ROLE_TARGET, 1].to(h.device)
        terms = lens_terms(h[:n], h0[:n], h[n:], h0[n:], langs, m.found, m.cfg.push_scale)
        micro = int(context[0, 3])
        self.values[micro] = torch.stack([terms[k].detach().double().cpu() for k in TERMS])
        keep = ~prompts
        if not bool(keep.any()):  # a placeholder row through the final norm and the LM head
            keep[0] = True
        hidden, context = hidden[:, keep.to(hidden.device)].contiguous(), context[keep]
        if torch.is_grad_enabled():
            hidden = AttachAuxLoss.apply(hidden, combine(m.cfg, terms) * self.micro_scale)
        return hidden, context

    # -- reference states -----------------------------------------------------------------

    def prepare(self, forward: StageForward, examples: Sequence[Example], batch_size: int) -> None:
        """theta_0's pooled top-layer states of every prompt, each DP rank a share; the last
        stage builds the reference table and the directions, then every stage gets them."""
        m, w = self.method, self.where
        self.pooled.clear()
        for group in m.prompt_batches(batch_size)[w.dp_rank :: w.dp_size]:
            forward(*self._prompt_rows(group, torch.full((len(group),), ROLE_PROBE), 0))
        if self.top:
            table = torch.zeros(len(m.prompt_texts), w.hidden_size, dtype=torch.float32)
            for index, row in self.pooled.items():
                table[index] = row
            table = table.to(w.device)
            if w.dp_size > 1:
                dist.all_reduce(table, group=w.dp_group)
            m.set_reference(table.cpu())
        self.pooled.clear()
        self._broadcast_state()

    def _broadcast_state(self) -> None:
        """The last stage's method state to every stage of this pipeline."""
        if self.where.pp_size == 1:
            return
        group = self.where.pp_group
        src = dist.get_global_rank(group, self.where.pp_size - 1)
        state = [self.method.state_dict() if self.top else None]
        dist.broadcast_object_list(state, src=src, group=group)
        self.method.load_state_dict(state[0])

    # -- the step ---------------------------------------------------------------------------

    def begin_step(self, num_microbatches: int) -> None:
        self.micro_scale = 1.0 / num_microbatches
        self.values.clear()

    def lm_term(self, lm: Tensor) -> Tensor:
        """lm_weight * LM; the Lens terms enter the backward at layer L."""
        return lm * self.method.cfg.lm_weight

    def step_values(self) -> Tensor:
        """(retain, push, pull) summed over this step's micro-batches (zeros off the last stage)."""
        values = torch.zeros(len(TERMS), dtype=torch.float64)
        for v in self.values.values():
            values += v
        return values

    def step_result(self, lm: float, values: Tensor) -> tuple[float, dict[str, float]]:
        terms = {k: values[i].item() for i, k in enumerate(TERMS)}
        metrics = {f"loss_{k}": v for k, v in terms.items()}
        with_lm = self.method.cfg.lm_weight > 0
        if with_lm:
            metrics["loss_lm"] = lm
        return combine(self.method.cfg, terms, lm if with_lm else None), metrics

    # -- state ----------------------------------------------------------------------------

    def sync_state(self) -> None:
        """Nothing: every stage holds the whole state since `prepare` (or `restore`)."""
