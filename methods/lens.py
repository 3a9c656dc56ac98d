"""Lens: edit the top k decoder layers so that target languages move toward English along the
language-agnostic direction and apart in the language-specific subspace, English kept.

Specification: docs/methods.md, "Lens specification". Choices made here:

- Representations h are the raw output of the top decoder layer L (before the final norm),
  mean-pooled over the tokens of each chat-formatted prompt (no answer tokens).
- Only layers L-k+1..L train; every other parameter has ``requires_grad=False`` before the
  engine wraps the model (the DeepSpeed engine hands only trainable parameters to ZeRO).
- theta_0's pooled states h0 are computed once, at prepare time, for every prompt of the prompt
  set (the same pass that gives the language means), and kept as ``[prompts, D]``. Everything
  below layer L-k+1 is frozen, so h0 of a prompt is a constant of the run: the frozen copy of the
  top k layers the specification allows would recompute the same values at every step. The
  table costs prompts x D floats (about 10 MB for 300 prompts at D = 8192) instead of k layers
  of weights, and it needs no replay: on the megatron engine the top layers may even sit on
  different pipeline stages. It travels with the method's checkpoint state.
- The decomposition (agnostic direction a, specific basis M, delta_X) comes from the language
  means of h0 over the prompt set (one all-reduce).
- Loss per micro-batch of parallel prompts (English + targets), each term an element mean:
  retain * MSE(h_en, h0_en) + sum_X MSE(P_M(h_X) - P_M(h0_X), w * delta_X)
  + pull * sum_X MSE(P_a(h_en), P_a(h_X)) [+ lm_weight * LM on the loop's batch].
  The loop's batch is not used unless lm_weight > 0.

The math (`lens_terms`, `combine`, `directions`) is plain tensor functions, shared with
the megatron stage (methods/lens_megatron.py); engines only decide where h comes from.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
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
from methods.shifcon.math import pooled_mean
from methods.subspace import agnostic_direction, decompose, project, project_direction
from model.layers import decoder_layers, device_of, rank_world, unwrap

META_FILE = "lens.json"
DIRECTIONS_FILE = "lens_directions.safetensors"
TERMS = ("retain", "push", "pull")


# -- the math (both engines) ---------------------------------------------------------------


@dataclass(frozen=True)
class Directions:
    """The decomposition of the top layer's language means that the Lens terms use."""

    a: Tensor  # agnostic direction [D]
    basis: Tensor  # specific basis M [D, r]
    deltas: Tensor  # delta_X [K, D] (row 0 = the dominant language = 0)


def directions(means: Tensor) -> Directions:
    """a, M and delta_X = P_M(mean h_X) - P_M(mean h_en) from the language means ``[K, D]``."""
    dec = decompose(means)
    basis = dec.specific_basis.float()
    return Directions(
        agnostic_direction(dec).float(), basis, project(means.float() - means[0].float(), basis)
    )


def language_means(pooled: Tensor, langs: Tensor, num_languages: int) -> Tensor:
    """Per-language mean of the pooled states ``[P, D]`` (float64 sums): ``[K, D]``."""
    sums = torch.zeros(num_languages, pooled.shape[1], dtype=torch.float64)
    counts = torch.zeros(num_languages, 1, dtype=torch.float64)
    sums.index_add_(0, langs, pooled.double().cpu())
    counts.index_add_(0, langs, torch.ones(len(langs), 1, dtype=torch.float64))
    return sums / counts


def lens_terms(
    h_en: Tensor,
    h0_en: Tensor,
    h_x: Tensor,
    h0_x: Tensor,
    lang: Tensor,
    found: Directions,
    push_scale: float,
) -> dict[str, Tensor]:
    """The three Lens terms (unweighted) of n parallel prompts: live h and theta_0's h0 ``[n, D]``
    of the English prompts and of their targets (language ids `lang` ``[n]``)."""
    device = h_en.device
    basis, a = found.basis.to(device), found.a.to(device)
    retain = F.mse_loss(h_en, h0_en)
    moved = project(h_x, basis) - project(h0_x, basis)
    push_each = (moved - push_scale * found.deltas.to(device)[lang]).pow(2).mean(-1)
    pull_each = (project_direction(h_en, a) - project_direction(h_x, a)).pow(2).mean(-1)
    push = h_en.new_zeros(())
    pull = h_en.new_zeros(())
    for k in lang.unique():  # sum over languages of the per-language mean
        sel = lang == k
        push = push + push_each[sel].mean()
        pull = pull + pull_each[sel].mean()
    return {"retain": retain, "push": push, "pull": pull}


def combine(cfg, terms: dict[str, Any], lm: Any = None) -> Any:
    """retain * retain + push + pull * pull [+ lm_weight * LM]: tensors or floats."""
    total = cfg.retain * terms["retain"] + terms["push"] + cfg.pull * terms["pull"]
    return total if lm is None else total + cfg.lm_weight * lm


def trained_range(n_layers: int, top_k: int) -> range:
    """The 1-based decoder layers Lens trains (a UserError when k does not fit)."""
    if top_k >= n_layers:
        raise UserError(f"method.top_k: {top_k} must be below the backbone's {n_layers} layers")
    return range(n_layers - top_k + 1, n_layers + 1)


# -- the method ----------------------------------------------------------------------------


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
        self._index_prompts()
        self.first = 0  # first trained layer (1-based)
        self.n_layers = 0
        self.found: Directions | None = None
        self.reference: Tensor | None = None  # theta_0's pooled top-layer states [P, D]

    def _index_prompts(self) -> None:
        """Every distinct (language, text) prompt once; each pair points at its two prompts."""
        index: dict[tuple[int, str], int] = {}
        self.prompt_langs: list[int] = []
        self.prompt_texts: list[str] = []

        def add(lang: int, text: str) -> int:
            if (lang, text) not in index:
                index[(lang, text)] = len(self.prompt_texts)
                self.prompt_langs.append(lang)
                self.prompt_texts.append(text)
            return index[(lang, text)]

        self.pair_prompts = [
            (add(0, p.en), add(self.lang_index[p.lang], p.target)) for p in self.pairs
        ]

    # -- wiring ---------------------------------------------------------------------------

    def set_depth(self, n_layers: int) -> range:
        """Learn the backbone's depth; returns the trained layers."""
        trained = trained_range(n_layers, self.cfg.top_k)
        self.n_layers, self.first = n_layers, trained.start
        return trained

    def attach(self, model: nn.Module) -> None:
        layers = decoder_layers(model)
        trained = self.set_depth(len(layers))
        for p in model.parameters():
            p.requires_grad_(False)
        for number in trained:
            for p in layers[number - 1].parameters():
                p.requires_grad_(True)

    def trained_layers(self) -> list[int]:
        return list(range(self.first, self.n_layers + 1))

    # -- prompts --------------------------------------------------------------------------

    def prompt_ids(self, index: int) -> list[int]:
        ids = chat_prompt_ids(self.tokenizer, self.prompt_texts[index], self.system_prompt)
        return ids[-self.cfg.prompts.max_length :]  # keep the end: it holds the generation cue

    def prompt_batches(self, batch_size: int) -> list[list[int]]:
        """Prompt indices in batches for the prepare pass (the same on every engine)."""
        n = len(self.prompt_texts)
        return [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]

    def pair_batch(self, rank: int, world: int) -> list[int]:
        """Indices into `pairs` of the next micro-batch of this data-parallel rank."""
        rng = random.Random(self.seed * 1_000_003 + self.calls * world + rank)
        self.calls += 1
        size = min(self.cfg.prompts.batch_size, len(self.pairs))
        return rng.sample(range(len(self.pairs)), size)

    def pair_rows(self, pairs: Sequence[int]) -> tuple[list[int], Tensor]:
        """Prompt indices of n pairs (n English, then n targets) and the targets' language ids."""
        en = [self.pair_prompts[i][0] for i in pairs]
        targets = [self.pair_prompts[i][1] for i in pairs]
        langs = torch.tensor([self.prompt_langs[i] for i in targets], dtype=torch.long)
        return en + targets, langs

    # -- forward (Hugging Face) -----------------------------------------------------------

    def top_states(self, model: nn.Module, ids: Tensor, mask: Tensor) -> Tensor:
        """Pooled top-layer states of the model, ``[B, D]``."""
        stack = decoder_layers(unwrap(model))
        cap: dict[str, Any] = {}

        def after(module, args, output):
            cap["out"] = output[0] if isinstance(output, tuple) else output

        handle = stack[len(stack) - 1].register_forward_hook(after)
        try:
            model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
        finally:
            handle.remove()
        return pooled_mean(cap["out"], mask)

    # -- reference states and decomposition -----------------------------------------------

    def prepare(self, model: nn.Module, examples: Sequence[Example], batch_size: int) -> None:
        """theta_0's pooled top-layer states of every prompt -> the reference table, a, M,
        delta_X. Each rank a share of the batches, equal forwards, one all-reduce."""
        rank, world = rank_world()
        device = device_of(model)
        hidden = unwrap(model).config.hidden_size
        pooled = torch.zeros(len(self.prompt_texts), hidden, dtype=torch.float32, device=device)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for group, filler in even_rounds(self.prompt_batches(batch_size), rank, world):
                ids, mask = right_pad(
                    [self.prompt_ids(i) for i in group], self.tokenizer.pad_token_id
                )
                h = self.top_states(model, ids.to(device), mask.to(device))
                if not filler:
                    pooled[group] = h
        model.train(was_training)
        if world > 1:
            torch.distributed.all_reduce(pooled)
        self.set_reference(pooled.cpu())

    def set_reference(self, pooled: Tensor) -> None:
        """The reference table ``[P, D]`` and the directions from its language means."""
        langs = torch.tensor(self.prompt_langs, dtype=torch.long)
        self.reference = pooled.float().cpu()
        self.found = directions(language_means(self.reference, langs, len(self.languages)))

    # -- training -------------------------------------------------------------------------

    def lens_losses(self, model: nn.Module) -> dict[str, Tensor]:
        """The three Lens terms (unweighted) on a fresh batch of parallel prompts."""
        rank, world = rank_world()
        prompts, langs = self.pair_rows(self.pair_batch(rank, world))
        device = device_of(model)
        ids, mask = right_pad([self.prompt_ids(i) for i in prompts], self.tokenizer.pad_token_id)
        h = self.top_states(model, ids.to(device), mask.to(device))
        h0 = self.reference[prompts].to(device)
        n = len(prompts) // 2
        return lens_terms(
            h[:n], h0[:n], h[n:], h0[n:], langs.to(device), self.found, self.cfg.push_scale
        )

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        terms = self.lens_losses(model)
        metrics = {f"loss_{k}": v.item() for k, v in terms.items()}
        lm = None
        if self.cfg.lm_weight > 0:
            lm = lm_loss(self.logits(model, batch), batch)
            metrics["loss_lm"] = lm.item()
        return combine(self.cfg, terms, lm), metrics

    # -- state ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        found = self.found
        return {
            "calls": self.calls,
            "a": None if found is None else found.a,
            "basis": None if found is None else found.basis,
            "deltas": None if found is None else found.deltas,
            "reference": self.reference,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = state.get("calls", 0)
        if state.get("a") is None:
            return
        if state.get("reference") is None:
            raise UserError(
                "checkpoint.resume: this Lens checkpoint predates the reference-state table "
                "(theta_0's pooled states); start the run again without resuming"
            )
        self.found = Directions(state["a"], state["basis"], state["deltas"])
        self.reference = state["reference"]

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
        if self.found is not None:
            save_file(
                {
                    "agnostic_direction": self.found.a.contiguous(),
                    "specific_basis": self.found.basis.contiguous(),
                    "deltas": self.found.deltas.contiguous(),
                },
                str(directory / DIRECTIONS_FILE),
            )

    def artifacts(self, export_dir: Path) -> list[Path]:
        return [Path(export_dir) / META_FILE, Path(export_dir) / DIRECTIONS_FILE]
