"""XTransplant search worker: one model, scores (language, split, target layer) units.

One unit runs, per instance, ONE forward (or one ``generate``) of a batch of B = number of
source layers copies of the main prompt, row b transplanting source layer ``sources[b]``. The
copies share everything before the last prompt token (causal attention, and the transplant sits
on that token), so the prompt prefix is run once and its KV cache repeated B times: a batch
costs one prompt plus B tokens (plus the choices or the decoding), not B prompts.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from data.formatting import right_pad
from launcher.xtransplant_config import Instance
from methods.xtransplant import Site, record_outputs, transplant
from model.layers import decoder_layers


@dataclass(frozen=True)
class Unit:
    """A slice of the search: one language, one split, one target layer (None = no transplant)."""

    lang: str
    split: str
    target: int | None


@dataclass
class UnitResult:
    unit: Unit
    sources: list[int]
    correct: list[list[bool]]  # [instance][source] (one column for the baseline)
    seconds: float = 0.0


class PairSearchWorker:
    """Holds one model; records aux outputs (cached per language/split) and scores units.

    ``batch_sources`` False scores each source layer in its own forward: the naive loop the
    batched path must equal (kept for tests and for models too large for B copies).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        task: str,
        site: Site = "mlp",
        max_new_tokens: int = 128,
        chat: bool = True,
        batch_size: int = 8,
        batch_sources: bool = True,
    ) -> None:
        from eval.scorer import HFScorer

        if task not in ("xcopa", "mgsm"):
            raise ValueError(f"task must be xcopa or mgsm, got {task!r}")
        self.scorer = HFScorer(model, tokenizer, batch_size=batch_size, chat=chat)
        self.model = model
        self.task = task
        self.site: Site = site
        self.max_new_tokens = max_new_tokens
        self.batch_sources = batch_sources
        self.num_layers = len(decoder_layers(model))
        self._recorded: dict[tuple[str, str], torch.Tensor] = {}

    @classmethod
    def load(cls, model_spec: str, *, dtype: str = "float32", attn: str = "sdpa", **kwargs: Any):
        """Build a worker from a model spec (what each Ray actor does on its own node)."""
        from eval.scorer import load_model

        model, tokenizer = load_model(
            model_spec, dtype=getattr(torch, dtype), attn_implementation=attn
        )
        return cls(model, tokenizer, **kwargs)

    # -- recording ------------------------------------------------------------------------------

    def _aux_ids(self, inst: Instance) -> list[int]:
        if self.task == "xcopa":
            return self.scorer.encode_text(inst.aux)
        return self.scorer.prompt_ids(inst.aux)

    def record(self, instances: Sequence[Instance]) -> torch.Tensor:
        """``[N, L, D]`` site outputs at each aux prompt's last token (batched, right-padded)."""

        out: list[torch.Tensor] = []
        size = self.scorer.batch_size
        for start in range(0, len(instances), size):
            seqs = [self._aux_ids(inst) for inst in instances[start : start + size]]
            ids, mask = right_pad(seqs, self.scorer.pad_id)
            positions = torch.tensor([len(s) - 1 for s in seqs])
            out.append(record_outputs(self.model, ids, mask, positions, self.site).cpu())
        return torch.cat(out)

    def recorded(self, key: tuple[str, str], instances: Sequence[Instance]) -> torch.Tensor:
        if key not in self._recorded:
            self._recorded[key] = self.record(instances)
        return self._recorded[key]

    # -- scoring -------------------------------------------------------------------------------

    def run_unit(
        self, unit: Unit, instances: Sequence[Instance], sources: Sequence[int]
    ) -> UnitResult:
        """Correctness of every instance for every source layer at ``unit.target``."""
        began = time.perf_counter()
        recorded = self.recorded((unit.lang, unit.split), instances)
        correct = []
        for n, inst in enumerate(instances):
            if unit.target is None:
                correct.append(self.score(inst, None, None))
            elif self.batch_sources:
                correct.append(self.score(inst, unit.target, recorded[n, list(sources)]))
            else:
                row: list[bool] = []
                for s in sources:
                    row += self.score(inst, unit.target, recorded[n, [s]])
                correct.append(row)
        srcs = [] if unit.target is None else list(sources)
        return UnitResult(unit, srcs, correct, time.perf_counter() - began)

    @torch.inference_mode()
    def score(self, inst: Instance, target: int | None, vectors: torch.Tensor | None) -> list[bool]:
        """One forward/generate over B = len(vectors) copies of the main prompt (1 if None)."""
        if self.task == "xcopa":
            return self.choice_correct(inst, target, vectors)
        from eval.answers import extract_number, numbers_match

        texts = self.generate(inst, target, vectors)
        return [numbers_match(extract_number(t), inst.gold) for t in texts]

    def _prefix_cache(self, prefix: Sequence[int], copies: int) -> Any:
        """KV cache of the prompt minus its last token, repeated for ``copies`` rows.

        Everything before the last prompt token is the same in every copy (the transplant only
        touches the last position, and attention is causal), so it is computed once; each row
        then runs only its last token (and, for XCOPA, its continuation) on top.
        """
        ids = torch.tensor([list(prefix)], device=self.scorer.device)
        cache = self.model.model(input_ids=ids, use_cache=True).past_key_values
        cache.batch_repeat_interleave(copies)
        return cache

    @torch.inference_mode()
    def choice_logprobs(
        self, inst: Instance, target: int | None, vectors: torch.Tensor | None
    ) -> torch.Tensor:
        """``[B, C]`` log-likelihood of each choice for each of the B transplant rows."""
        from eval.scorer import continuation_logprob

        copies = 1 if vectors is None else vectors.shape[0]
        ctx = self.scorer.encode_text(inst.main)
        conts = [self.scorer.encode_pair(inst.main, c)[1] for c in inst.choices]
        if len(ctx) < 2 or len(ctx) + max(map(len, conts)) > self.scorer.max_length + 1:
            raise ValueError(f"instance {inst.key}: context of {len(ctx)} tokens does not fit")
        n_choices = len(conts)
        # Row (b, c): the context's last token, then choice c; scored on choice c's tokens.
        seqs = [[ctx[-1], *cont] for _ in range(copies) for cont in conts]
        ids, _ = right_pad([s[:-1] for s in seqs], self.scorer.pad_id)
        device = self.scorer.device
        cache = self._prefix_cache(ctx[:-1], len(seqs))
        if target is None or vectors is None:
            logits = self.model(input_ids=ids.to(device), past_key_values=cache).logits
        else:
            rows = vectors.repeat_interleave(n_choices, dim=0)
            zeros = torch.zeros(len(seqs), dtype=torch.long)  # the last prompt token leads
            with transplant(self.model, target, rows, zeros, site=self.site,
                            prompt_len=ids.shape[1]):  # fmt: skip
                logits = self.model(input_ids=ids.to(device), past_key_values=cache).logits
        scores = [
            continuation_logprob(logits[r], seqs[r], len(seqs[r]) - 1).logprob
            for r in range(len(seqs))
        ]
        return torch.tensor(scores, dtype=torch.float64).view(copies, n_choices)

    def choice_correct(
        self, inst: Instance, target: int | None, vectors: torch.Tensor | None
    ) -> list[bool]:
        out = []
        for scores in self.choice_logprobs(inst, target, vectors).tolist():
            pred = max(range(len(scores)), key=lambda c: (scores[c], -c))  # ties: first choice
            out.append(pred == int(inst.gold))
        return out

    @torch.inference_mode()
    def generate(
        self, inst: Instance, target: int | None, vectors: torch.Tensor | None
    ) -> list[str]:
        """Greedy answers of B copies of the main prompt, row b transplanted by vectors[b]."""
        copies = 1 if vectors is None else vectors.shape[0]
        prompt = self.scorer.prompt_ids(inst.main)
        if len(prompt) < 2:
            raise ValueError(f"instance {inst.key}: a prompt needs at least 2 tokens")
        ids = torch.tensor([prompt] * copies, dtype=torch.long)
        mask = torch.ones_like(ids)
        cache = self._prefix_cache(prompt[:-1], copies)
        # With the prefix cached, generate's prefill is the last prompt token alone (length 1);
        # the hook is one-shot, so the decode steps after it (also length 1) pass untouched.
        if target is None or vectors is None:
            new = self.scorer.generate_ids(ids, mask, self.max_new_tokens, past_key_values=cache)
        else:
            zeros = torch.zeros(copies, dtype=torch.long)
            with transplant(self.model, target, vectors, zeros, site=self.site, prompt_len=1):
                new = self.scorer.generate_ids(
                    ids, mask, self.max_new_tokens, past_key_values=cache
                )
        return [self.scorer.decode(row) for row in new]
