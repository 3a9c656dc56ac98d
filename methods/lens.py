"""Lens: edit the top k decoder layers so that target languages move toward English along the
language-agnostic direction and apart in the language-specific subspace, English kept.

Specification: docs/methods.md, "Lens specification". Choices made here:

- Representations h are the raw output of the top decoder layer L (before the final norm),
  mean-pooled over the content tokens of each chat-formatted prompt (no answer tokens).
- Only layers L-k+1..L train; every other parameter has ``requires_grad=False`` before the
  engine wraps the model (the DeepSpeed engine hands only trainable parameters to ZeRO).
- theta_0 is a frozen copy of just those k layers, kept outside the model. The reference h0 is
  computed on the same forward: a pre-hook on layer L-k+1 captures its call (hidden states,
  rotary embeddings, mask...) — identical to theta_0's because everything below is frozen —
  and replays it through the frozen copies.
- The decomposition (agnostic direction a, specific basis M, delta_X) is computed once, at
  prepare time, from the language means of h over the prompt set (one all-reduce).
- Loss per micro-batch of parallel prompts (English + targets), each term an element mean:
  retain * MSE(h_en, h0_en) + sum_X MSE(P_M(h_X) - P_M(h0_X), w * delta_X)
  + pull * sum_X MSE(P_a(h_en), P_a(h_X)) [+ lm_weight * LM on the loop's batch].
  The loop's batch is not used unless lm_weight > 0.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from config.errors import UserError
from data.batching import even_rounds
from data.formatting import Batch, Example, chat_prompt_ids, right_pad
from data.pairs import Pair, load_pairs
from methods.base import Method, lm_loss
from methods.subspace import agnostic_direction, decompose, project, project_direction
from model.layers import decoder_layers, device_of, rank_world, unwrap

META_FILE = "lens.json"
DIRECTIONS_FILE = "lens_directions.safetensors"


def frozen_copy(layer: nn.Module, config, layer_idx: int) -> nn.Module:
    """A detached, frozen copy of one decoder layer (full weights even under ZeRO-3).

    Built fresh with the layer's own class (Llama-family signature ``(config, layer_idx)``)
    rather than deep-copied, so no ZeRO hooks or partition attributes come along.
    """
    params = list(layer.parameters())
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    else:
        gather = nullcontext()
    with gather:
        weights = {name: p.data.detach().clone() for name, p in layer.named_parameters()}
    copy = type(layer)(config, layer_idx)
    for name, p in copy.named_parameters():
        p.data = weights[name]
        p.requires_grad_(False)
    return copy.eval()


def _pool(h: Tensor, mask: Tensor) -> Tensor:
    w = mask.to(device=h.device, dtype=torch.float32)
    return torch.einsum("btd,bt->bd", h.float(), w) / w.sum(1, keepdim=True).clamp(min=1.0)


class Lens(Method):
    name = "lens"

    def __init__(
        self,
        cfg,
        *,
        languages: Sequence[str],
        tokenizer,
        train_rows: Sequence[dict],
        seed: int,
        on_bad_row: str = "error",
        system_prompt: str | None = None,
    ) -> None:
        self.cfg = cfg
        dominant = languages[0]
        targets = list(cfg.languages) if cfg.languages else list(languages[1:])
        unknown = [x for x in targets if x == dominant]
        if not targets or unknown:
            raise UserError(f"method.languages: need target languages other than {dominant!r}")
        self.languages = [dominant, *targets]
        self.lang_index = {lang: i for i, lang in enumerate(self.languages)}
        per_language = math.ceil(cfg.prompts.count / len(targets))
        self.pairs: list[Pair] = load_pairs(
            cfg.prompts.path,
            train_rows=train_rows,
            dominant=dominant,
            languages=self.languages,
            limit_per_language=per_language,
            on_bad_row=on_bad_row,
        )
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.seed = seed
        self.calls = 0
        self.frozen: list[nn.Module] = []
        self.first = 0  # first trained layer (1-based)
        self.n_layers = 0
        self.a: Tensor | None = None  # agnostic direction [D]
        self.basis: Tensor | None = None  # specific basis M [D, r]
        self.deltas: Tensor | None = None  # delta_X [K, D] (row 0 = English = 0)

    # -- wiring ---------------------------------------------------------------------------

    def attach(self, model: nn.Module) -> None:
        layers = decoder_layers(model)
        self.n_layers, k = len(layers), self.cfg.top_k
        if k >= self.n_layers:
            raise UserError(
                f"method.top_k: {k} must be below the backbone's {self.n_layers} layers"
            )
        self.first = self.n_layers - k + 1
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in layers[self.first - 1 :]:
            for p in layer.parameters():
                p.requires_grad_(True)
        self.frozen = [
            frozen_copy(layers[i - 1], model.config, i - 1)
            for i in range(self.first, self.n_layers + 1)
        ]

    def trained_layers(self) -> list[int]:
        return list(range(self.first, self.n_layers + 1))

    # -- forward --------------------------------------------------------------------------

    def _prompt_ids(self, text: str) -> list[int]:
        ids = chat_prompt_ids(self.tokenizer, text, self.system_prompt)
        return ids[-self.cfg.prompts.max_length :]  # keep the end: it holds the generation cue

    def top_states(
        self, model: nn.Module, ids: Tensor, mask: Tensor, reference: bool = True
    ) -> tuple[Tensor, Tensor | None]:
        """Pooled top-layer states of the live model and (optionally) of theta_0, ``[B, D]``."""
        stack = decoder_layers(unwrap(model))
        cap: dict[str, Any] = {}

        def before(module, args, kwargs):
            cap["call"] = (args, kwargs)

        def after(module, args, output):
            cap["out"] = output[0] if isinstance(output, tuple) else output

        handles = [stack[self.n_layers - 1].register_forward_hook(after)]
        if reference:
            handles.append(
                stack[self.first - 1].register_forward_pre_hook(before, with_kwargs=True)
            )
        try:
            model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
        finally:
            for handle in handles:
                handle.remove()
        h = _pool(cap["out"], mask)
        if not reference:
            return h, None
        args, kwargs = cap["call"]
        kwargs = dict(kwargs)
        x = args[0] if args else kwargs.pop("hidden_states")
        with torch.no_grad():
            x = x.detach()
            for layer in self.frozen:
                layer.to(x.device)
                out = layer(x, *args[1:], **kwargs)
                x = out[0] if isinstance(out, tuple) else out
        return h, _pool(x, mask)

    # -- decomposition --------------------------------------------------------------------

    def prepare(self, model: nn.Module, examples: Sequence[Example], batch_size: int) -> None:
        """Language means of theta_0's pooled top-layer states over the prompt set -> a, M,
        delta_X. Each rank a share of the batches, equal forwards, one all-reduce."""
        rank, world = rank_world()
        device = device_of(model)
        seqs: list[tuple[int, list[int]]] = []
        seen: set[str] = set()
        for p in self.pairs:
            if p.en not in seen:
                seen.add(p.en)
                seqs.append((0, self._prompt_ids(p.en)))
            seqs.append((self.lang_index[p.lang], self._prompt_ids(p.target)))
        batches = [seqs[i : i + batch_size] for i in range(0, len(seqs), batch_size)]
        hidden = unwrap(model).config.hidden_size
        sums = torch.zeros(len(self.languages), hidden + 1, dtype=torch.float64, device=device)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for group, filler in even_rounds(batches, rank, world):
                ids, mask = right_pad([s for _, s in group], self.tokenizer.pad_token_id)
                ids, mask = ids.to(device), mask.to(device)
                h, _ = self.top_states(model, ids, mask, reference=False)
                if not filler:
                    lang = torch.tensor([k for k, _ in group], device=device)
                    sums[:, :hidden].index_add_(0, lang, h.double())
                    sums[:, hidden].index_add_(0, lang, torch.ones_like(lang, dtype=sums.dtype))
        model.train(was_training)
        if world > 1:
            torch.distributed.all_reduce(sums)
        means = (sums[:, :hidden] / sums[:, hidden:]).cpu()
        self._set_directions(means)

    def _set_directions(self, means: Tensor) -> None:
        dec = decompose(means)
        self.a = agnostic_direction(dec).float()
        self.basis = dec.specific_basis.float()
        self.deltas = project(means.float() - means[0].float(), self.basis)

    # -- training -------------------------------------------------------------------------

    def _pair_batch(self) -> list[Pair]:
        rank, world = rank_world()
        rng = random.Random(self.seed * 1_000_003 + self.calls * world + rank)
        self.calls += 1
        size = min(self.cfg.prompts.batch_size, len(self.pairs))
        return [self.pairs[i] for i in rng.sample(range(len(self.pairs)), size)]

    def lens_losses(self, model: nn.Module) -> dict[str, Tensor]:
        """The three Lens terms (unweighted) on a fresh batch of parallel prompts."""
        pairs = self._pair_batch()
        device = device_of(model)
        seqs = [self._prompt_ids(p.en) for p in pairs] + [self._prompt_ids(p.target) for p in pairs]
        ids, mask = right_pad(seqs, self.tokenizer.pad_token_id)
        ids, mask = ids.to(device), mask.to(device)
        h, h0 = self.top_states(model, ids, mask)
        n = len(pairs)
        lang = torch.tensor([self.lang_index[p.lang] for p in pairs], device=device)
        basis, a = self.basis.to(device), self.a.to(device)
        retain = F.mse_loss(h[:n], h0[:n])
        moved = project(h[n:], basis) - project(h0[n:], basis)
        push_each = (moved - self.cfg.push_scale * self.deltas.to(device)[lang]).pow(2).mean(-1)
        pull_each = (project_direction(h[:n], a) - project_direction(h[n:], a)).pow(2).mean(-1)
        push = h.new_zeros(())
        pull = h.new_zeros(())
        for k in lang.unique():  # sum over languages of the per-language mean
            sel = lang == k
            push = push + push_each[sel].mean()
            pull = pull + pull_each[sel].mean()
        return {"retain": retain, "push": push, "pull": pull}

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        terms = self.lens_losses(model)
        total = self.cfg.retain * terms["retain"] + terms["push"] + self.cfg.pull * terms["pull"]
        metrics = {f"loss_{k}": v.item() for k, v in terms.items()}
        if self.cfg.lm_weight > 0:
            lm = lm_loss(self.logits(model, batch), batch)
            total = total + self.cfg.lm_weight * lm
            metrics["loss_lm"] = lm.item()
        return total, metrics

    # -- state ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "a": self.a,
            "basis": self.basis,
            "deltas": self.deltas,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = state.get("calls", 0)
        if state.get("a") is not None:
            self.a, self.basis, self.deltas = state["a"], state["basis"], state["deltas"]

    def export(self, directory: Path) -> None:
        directory = Path(directory)
        meta = {
            "format": 1,
            "config": self.cfg.model_dump(mode="json"),
            "top_k": self.cfg.top_k,
            "trained_layers": self.trained_layers(),
            "languages": self.languages,
            "representation": "raw output of the top decoder layer, mean over prompt tokens",
        }
        (directory / META_FILE).write_text(json.dumps(meta, indent=2))
        if self.a is not None:
            save_file(
                {
                    "agnostic_direction": self.a.contiguous(),
                    "specific_basis": self.basis.contiguous(),
                    "deltas": self.deltas.contiguous(),
                },
                str(directory / DIRECTIONS_FILE),
            )

    def artifacts(self, export_dir: Path) -> list[Path]:
        return [Path(export_dir) / META_FILE, Path(export_dir) / DIRECTIONS_FILE]
