"""Recipe data section -> tokenised train and held-out examples, and the run's language list."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field

from config.errors import UserError
from config.schema import DataSection, DataSource
from data.formatting import Example, encode_rows
from data.sources import LoadReport, load_rows


@dataclass
class RunData:
    train: list[Example]
    eval: list[Example]
    languages: list[str]  # dominant language first; index = language id
    train_rows: list[dict] = field(default_factory=list)  # raw rows (methods build pairs from them)
    reports: list[LoadReport] = field(default_factory=list)
    dropped_too_long: int = 0

    def summary(self) -> dict[str, dict]:
        return {
            "train": dict(sorted(Counter(e.lang for e in self.train).items())),
            "eval": dict(sorted(Counter(e.lang for e in self.eval).items())),
            "skipped_rows": {r.source: r.reasons for r in self.reports if r.skipped},
            "dropped_too_long": self.dropped_too_long,
        }


def _held_out(item_id: str, fraction: float) -> bool:
    """Split by item id, so a held-out item is held out in every language (parallel data)."""
    digest = hashlib.sha256(item_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _load(sources: list[DataSource], section: DataSection) -> tuple[list[dict], list[LoadReport]]:
    rows: list[dict] = []
    reports = []
    for source in sources:
        got, report = load_rows(
            source.path,
            fields=source.fields or None,
            language=source.language,
            format=source.format,
            on_bad_row=section.on_bad_row,
            split=source.split,
            limit=source.limit,
        )
        rows.extend(got)
        reports.append(report)
    return rows, reports


def order_languages(found: set[str], section: DataSection) -> list[str]:
    wanted = section.languages if section.languages is not None else sorted(found)
    missing = [lang for lang in wanted if lang not in found]
    if missing:
        raise UserError(f"data.languages: no training rows for {missing} (found {sorted(found)})")
    if section.dominant_language not in wanted:
        raise UserError(
            f"data.dominant_language: no rows in {section.dominant_language!r} "
            f"(languages: {sorted(wanted)})"
        )
    rest = sorted(lang for lang in wanted if lang != section.dominant_language)
    return [section.dominant_language, *rest]


def build_run_data(section: DataSection, tokenizer) -> RunData:
    train_rows, reports = _load(section.train, section)
    if section.eval:
        eval_rows, eval_reports = _load(section.eval, section)
        reports += eval_reports
    else:
        eval_rows = [r for r in train_rows if _held_out(r["id"], section.eval_fraction)]
        train_rows = [r for r in train_rows if not _held_out(r["id"], section.eval_fraction)]
    languages = order_languages({r["lang"] for r in train_rows}, section)
    keep = set(languages)

    per_lang: Counter[str] = Counter()
    capped = []
    for row in eval_rows:
        if per_lang[row["lang"]] < section.eval_samples_per_language:
            per_lang[row["lang"]] += 1
            capped.append(row)
    train_rows = [r for r in train_rows if r["lang"] in keep]
    train, held_out = (
        encode_rows(tokenizer, rows, keep, max_length=section.max_length,
                    system_prompt=section.system_prompt)
        for rows in (train_rows, capped)
    )  # fmt: skip
    return RunData(train[0], held_out[0], languages, train_rows, reports, train[1] + held_out[1])
