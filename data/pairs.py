"""Parallel (dominant-language, target-language) pairs for contrastive learning."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from config.errors import UserError
from data.sources import load_rows


@dataclass(frozen=True)
class Pair:
    id: str
    lang: str  # the target language
    en: str  # dominant-language text
    target: str


def pairs_from_rows(rows: Sequence[dict], dominant: str, field: str = "instruction") -> list[Pair]:
    """Rows sharing an id are translations of each other (the project's own data is built so)."""
    by_id: dict[str, dict[str, str]] = defaultdict(dict)
    for row in rows:
        by_id[row["id"]][row["lang"]] = row[field]
    return [
        Pair(item, lang, texts[dominant], text)
        for item, texts in by_id.items()
        if dominant in texts
        for lang, text in sorted(texts.items())
        if lang != dominant
    ]


def load_pairs(
    path: str,
    *,
    train_rows: Sequence[dict],
    dominant: str,
    languages: Sequence[str],
    limit_per_language: int | None = None,
    on_bad_row: str = "error",
) -> list[Pair]:
    """Pairs for every non-dominant language of the run; a language without pairs is an error."""
    if path == "train":
        pairs = pairs_from_rows(train_rows, dominant)
    else:  # {lang, en, target} rows, as in the shared parallel data
        rows, _ = load_rows(
            path, fields={"instruction": "en", "response": "target"}, on_bad_row=on_bad_row
        )
        pairs = [Pair(r["id"], r["lang"], r["instruction"], r["response"]) for r in rows]
    wanted = [lang for lang in languages if lang != dominant]
    pairs = [p for p in pairs if p.lang in wanted]
    if limit_per_language is not None:
        seen: Counter[str] = Counter()
        kept = []
        for p in pairs:
            if seen[p.lang] < limit_per_language:
                seen[p.lang] += 1
                kept.append(p)
        pairs = kept
    have = {p.lang for p in pairs}
    missing = [lang for lang in wanted if lang not in have]
    if missing:
        raise UserError(f"method.pairs: no parallel pairs for language(s) {missing} in {path!r}")
    return pairs
