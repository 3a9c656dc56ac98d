"""Generation with a ShifCon export: the shift stays on at inference, for every position.

    python -m launcher.shifcon_infer generate runs/x/export --prompt "Habari?" [--lang sw|auto]
    python -m launcher.shifcon_infer detect-eval runs/x/export --data builtin:polyglot?items=50

The prompt's language is given, or detected as the nearest language centroid (v^X_f) of the
prompt's mean unshifted H_f, the same quantity the vectors are means of.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch

from data.formatting import Batch, chat_prompt_ids, left_pad, right_pad
from methods.shifcon.method import ShifConHooks, capture_hidden, load_shifcon


class ShiftedLM:
    def __init__(self, model, tokenizer, meta: dict, stats) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.languages: list[str] = list(meta["languages"])
        self.band = tuple(meta["band"])
        self.stats = stats
        self.hooks = ShifConHooks(model, self.band, dominant=0)
        self.hooks.set_vectors(stats)

    @classmethod
    def from_export(cls, directory: str | Path, dtype: torch.dtype = torch.float32) -> ShiftedLM:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        meta, stats = load_shifcon(Path(directory))
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        return cls(model, tokenizer, meta, stats)

    def lang_ids(self, langs: Sequence[str]) -> torch.Tensor:
        unknown = sorted(set(langs) - set(self.languages))
        if unknown:
            raise ValueError(f"languages {unknown} have no vectors; known: {self.languages}")
        return torch.tensor([self.languages.index(lang) for lang in langs], dtype=torch.long)

    def _prompt_batch(self, prompts: Sequence[str], system_prompt: str | None, left: bool):
        ids = [chat_prompt_ids(self.tokenizer, p, system_prompt) for p in prompts]
        return (left_pad if left else right_pad)(ids, self.tokenizer.pad_token_id)

    @torch.no_grad()
    def detect(self, prompts: Sequence[str], system_prompt: str | None = None) -> list[str]:
        input_ids, mask = self._prompt_batch(prompts, system_prompt, left=False)
        batch = Batch(input_ids, mask, input_ids, torch.zeros(len(prompts), dtype=torch.long))
        f = self.band[0]
        h = capture_hidden(self.model, self.model, batch, [f])[f].double()
        m = mask.unsqueeze(-1).double()
        means = (h * m).sum(1) / m.sum(1)
        centroids = self.stats.layer_means(f).to(means)
        nearest = torch.cdist(means, centroids).argmin(dim=1)
        return [self.languages[i] for i in nearest.tolist()]

    @torch.no_grad()
    def logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, langs: Sequence[str] | None
    ) -> torch.Tensor:
        """Logits with the shift for `langs`, or of the plain model when `langs` is None."""
        lang_ids = None if langs is None else self.lang_ids(langs)
        with self.hooks.inference_languages(lang_ids):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        langs: Sequence[str] | str | None = "auto",
        *,
        max_new_tokens: int = 64,
        system_prompt: str | None = None,
    ) -> list[str]:
        """Greedy answers; `langs`: one per prompt, "auto" to detect, None for no shift."""
        if langs == "auto":
            langs = self.detect(prompts, system_prompt)
        elif isinstance(langs, str):
            langs = [langs] * len(prompts)
        input_ids, mask = self._prompt_batch(prompts, system_prompt, left=True)
        out = self.generate_ids(input_ids, mask, langs, max_new_tokens=max_new_tokens)
        return self.tokenizer.batch_decode(out[:, input_ids.shape[1] :], skip_special_tokens=True)

    @torch.no_grad()
    def generate_ids(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        langs: Sequence[str] | None,
        *,
        max_new_tokens: int,
    ) -> torch.Tensor:
        """Greedy decoding with the KV cache; every step (prefill and decode) is shifted."""
        lang_ids = None if langs is None else self.lang_ids(langs)
        with self.hooks.inference_languages(lang_ids):
            return self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
            )


def detection_accuracy(
    lm: ShiftedLM, rows: Sequence[dict], batch_size: int = 16
) -> dict[str, float]:
    """Per-language share of prompts whose detected language is their own."""
    rows = [r for r in rows if r["lang"] in lm.languages]
    hits: Counter[str] = Counter()
    totals: Counter[str] = Counter()
    for start in range(0, len(rows), batch_size):
        group = rows[start : start + batch_size]
        found = lm.detect([r["instruction"] for r in group])
        for row, lang in zip(group, found, strict=True):
            totals[row["lang"]] += 1
            hits[row["lang"]] += lang == row["lang"]
    return {lang: hits[lang] / totals[lang] for lang in lm.languages if totals[lang]}
