"""Generation with a ShifCon export: the shift stays on at inference, as in training.

    python -m launcher.shifcon_infer generate runs/x/export --prompt "Habari?" [--lang sw|auto]
    python -m launcher.shifcon_infer detect-eval runs/x/export --data builtin:polyglot?items=50

The prompt's language is given, or detected (`methods/shifcon/detect.py`): by the linear
detector saved with the export on the prompt's pooled unshifted H_f, else the nearest language
vector v^X_f of that same feature, or by text language ID (py3langid).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch

from data.formatting import (
    Example,
    chat_prompt_ids,
    collate,
    content_span,
    left_pad,
    right_pad,
)
from methods.shifcon.detect import DETECTORS, LinearDetector, TextLanguageID, nearest_centroid
from methods.shifcon.math import pooled_mean
from methods.shifcon.method import ShifConHooks, capture_hidden, load_shifcon


class ShiftedLM:
    def __init__(
        self, model, tokenizer, meta: dict, stats, detector: LinearDetector | None = None
    ) -> None:
        self.model = model.eval()
        self.detector = detector
        self._text_id: TextLanguageID | None = None
        self.tokenizer = tokenizer
        self.languages: list[str] = list(meta["languages"])
        self.band = tuple(meta["band"])
        self.stats = stats
        self.shift_positions = str(meta.get("shift_positions", "all"))
        self.hooks = ShifConHooks(model, self.band, dominant=0, positions=self.shift_positions)
        self.hooks.set_vectors(stats)

    @classmethod
    def from_export(cls, directory: str | Path, dtype: torch.dtype = torch.float32) -> ShiftedLM:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        meta, stats = load_shifcon(Path(directory))
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        return cls(model, tokenizer, meta, stats, LinearDetector.load(Path(directory)))

    def lang_ids(self, langs: Sequence[str]) -> torch.Tensor:
        unknown = sorted(set(langs) - set(self.languages))
        if unknown:
            raise ValueError(f"languages {unknown} have no vectors; known: {self.languages}")
        return torch.tensor([self.languages.index(lang) for lang in langs], dtype=torch.long)

    def _prompt_batch(self, prompts: Sequence[str], system_prompt: str | None, left: bool):
        ids = [chat_prompt_ids(self.tokenizer, p, system_prompt) for p in prompts]
        return (left_pad if left else right_pad)(ids, self.tokenizer.pad_token_id)

    @torch.no_grad()
    def prompt_features(
        self, prompts: Sequence[str], system_prompt: str | None = None
    ) -> torch.Tensor:
        """Pooled unshifted H_f of each chat prompt over its content span, ``[N, D]``."""
        examples = []
        for p in prompts:
            ids = chat_prompt_ids(self.tokenizer, p, system_prompt)
            examples.append(
                Example(ids, ids, "", "", span=content_span(self.tokenizer, p, system_prompt))
            )
        batch = collate(examples, self.tokenizer.pad_token_id, [""])
        f = self.band[0]
        device = next(self.model.parameters()).device
        h = capture_hidden(self.model, self.model, batch.to(device), [f])[f]
        return pooled_mean(h, batch.pool_mask().to(device)).cpu()

    @torch.no_grad()
    def detect(
        self, prompts: Sequence[str], system_prompt: str | None = None, detector: str = "auto"
    ) -> list[str]:
        """The language of each prompt; ``detector``: auto (linear when the export has one,
        else centroid), centroid, linear or langid (see `methods/shifcon/detect.py`)."""
        if detector == "auto":
            detector = "linear" if self.detector is not None else "centroid"
        if detector not in DETECTORS:
            raise ValueError(f"detector must be auto or one of {DETECTORS}, got {detector!r}")
        if detector == "langid":
            if self._text_id is None:
                self._text_id = TextLanguageID(self.languages)
            return self._text_id(prompts)
        return self.classify_features(self.prompt_features(prompts, system_prompt), detector)

    def classify_features(self, features: torch.Tensor, detector: str) -> list[str]:
        """Languages of pooled H_f features by the linear detector or the nearest vector."""
        if detector == "linear" and self.detector is None:
            raise ValueError("this export has no linear detector (trained before it existed)")
        if detector == "linear":
            found = self.detector.predict(features)
        else:
            found = nearest_centroid(features, self.stats.layer_means(self.band[0]))
        return [self.languages[i] for i in found.tolist()]

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
        min_new_tokens: int = 0,
    ) -> torch.Tensor:
        """Greedy decoding with the KV cache, shifted as the export was trained: every step
        (`shift_positions: all`) or the prompt only (`prompt`). A row stops at its EOS unless
        ``min_new_tokens`` (benchmarks: equal token counts) asks for more."""
        lang_ids = None if langs is None else self.lang_ids(langs)
        with self.hooks.inference_languages(lang_ids):
            return self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                min_new_tokens=min_new_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
            )


def detection_accuracies(
    lm: ShiftedLM, rows: Sequence[dict], detectors: Sequence[str], batch_size: int = 16
) -> dict[str, dict[str, float]]:
    """{detector: per-language accuracy}; the model's features are computed once for all."""
    rows = [r for r in rows if r["lang"] in lm.languages]
    texts = [r["instruction"] for r in rows]
    found: dict[str, list[str]] = {}
    if any(d != "langid" for d in detectors):
        feats = torch.cat(
            [
                lm.prompt_features(texts[i : i + batch_size])
                for i in range(0, len(texts), batch_size)
            ]
        )
    for det in detectors:
        if det == "langid":
            found[det] = lm.detect(texts, detector="langid")
        else:
            found[det] = lm.classify_features(feats, det)
    out = {}
    for det, langs in found.items():
        hits: Counter[str] = Counter()
        totals: Counter[str] = Counter()
        for row, lang in zip(rows, langs, strict=True):
            totals[row["lang"]] += 1
            hits[row["lang"]] += lang == row["lang"]
        out[det] = {lang: hits[lang] / totals[lang] for lang in lm.languages if totals[lang]}
    return out


def detection_accuracy(
    lm: ShiftedLM, rows: Sequence[dict], batch_size: int = 16, detector: str = "auto"
) -> dict[str, float]:
    """Per-language share of prompts whose detected language is their own."""
    rows = [r for r in rows if r["lang"] in lm.languages]
    hits: Counter[str] = Counter()
    totals: Counter[str] = Counter()
    for start in range(0, len(rows), batch_size):
        group = rows[start : start + batch_size]
        found = lm.detect([r["instruction"] for r in group], detector=detector)
        for row, lang in zip(group, found, strict=True):
            totals[row["lang"]] += 1
            hits[row["lang"]] += lang == row["lang"]
    return {lang: hits[lang] / totals[lang] for lang in lm.languages if totals[lang]}
