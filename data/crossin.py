"""CrossIn: cross-lingual instruction-tuning mixtures from parallel instruction data.

From rows grouped by ``id`` across languages (``{id, lang, instruction, response}``, e.g. the
built-in polyglot set) build a mixture of four modes:

* ``en2x``: instruction in the pivot language (English), answer in language X;
* ``x2en``: instruction in X, answer in the pivot;
* ``x2x``: instruction in X1, answer in X2, both drawn independently from the non-pivot
  languages (so X1 = X2 happens, with probability 1/K for K languages);
* ``translate``: "Translate the following text into <Language>:" + a text (instruction or
  response of an item) in one language, answered by the same text in the other; one side is
  always the pivot, both directions.

Output-language tag. Every instruction ends with a line ``[Answer in <Language>]`` (English
language name, e.g. ``[Answer in Swahili]``), translation prompts included, so one rule holds
for training and inference: the last line of the prompt names the language of the answer.
It is a suffix rather than a prefix because it then sits right before the answer, where a small
model uses it most; ``tag_template`` changes the wording (it must contain ``{language}``).

Sampling. ``size`` rows are split over the modes by the proportions (largest-remainder
rounding, so the counts sum to ``size`` exactly). Within a mode, the candidate space (item x
language pair [x field]) is sampled without replacement; only when a mode asks for more rows
than it has candidates does it cycle through fresh permutations. Everything is drawn from one
``random.Random(seed)``: the same rows and seed give the same dataset.

Columns: ``id`` (the source item's id, so that the training pipeline's held-out split by id
keeps an item out of training in every mode and language), ``lang`` (= ``tgt_lang``, the
output language: the training pipeline reports losses per output language), ``instruction``,
``response``, ``mode``, ``src_lang``, ``tgt_lang``. The loss is on the response only: that is
``data.formatting.encode_example``'s job, as for any other training data.

CLI (prepare-data)::

    python -m data.crossin --source builtin:polyglot?items=200 --out runs/data/crossin \\
        --size 1000 --proportions en2x=0.3,x2en=0.2,x2x=0.3,translate=0.2 --seed 0

writes ``OUT/crossin.jsonl`` (what ``data.train: [{path: OUT}]`` reads), ``OUT/dataset``
(``Dataset.save_to_disk``) and ``OUT/summary.json``, and prints the counts per mode and pair.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import random
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from config.cli import bounded_int, run_cli

MODES: tuple[str, ...] = ("en2x", "x2en", "x2x", "translate")
COLUMNS: tuple[str, ...] = ("id", "lang", "instruction", "response", "mode", "src_lang", "tgt_lang")
DEFAULT_TAG = "[Answer in {language}]"
TRANSLATE_TEMPLATE = "Translate the following text into {language}:\n{text}"
TRANSLATE_FIELDS: tuple[str, ...] = ("instruction", "response")

# English names of languages, for tags and translation prompts (override with language_names).
LANGUAGE_NAMES: dict[str, str] = {
    "ar": "Arabic", "bn": "Bengali", "de": "German", "el": "Greek", "en": "English",
    "es": "Spanish", "et": "Estonian", "fa": "Persian", "fi": "Finnish", "fr": "French",
    "he": "Hebrew", "hi": "Hindi", "ht": "Haitian Creole", "id": "Indonesian", "it": "Italian",
    "ja": "Japanese", "ko": "Korean", "nl": "Dutch", "pl": "Polish", "pt": "Portuguese",
    "qu": "Quechua", "ru": "Russian", "sw": "Swahili", "ta": "Tamil", "te": "Telugu",
    "th": "Thai", "tr": "Turkish", "uk": "Ukrainian", "ur": "Urdu", "vi": "Vietnamese",
    "zh": "Chinese",
}  # fmt: skip


class CrossInError(ValueError):
    """Bad CrossIn settings or data; the message names the option or the item."""


@dataclass
class CrossInConfig:
    """How to mix; ``proportions`` may omit modes (they get 0) but must sum to 1."""

    size: int
    proportions: Mapping[str, float] = field(
        default_factory=lambda: {"en2x": 0.3, "x2en": 0.2, "x2x": 0.3, "translate": 0.2}
    )
    seed: int = 0
    pivot: str = "en"
    languages: Sequence[str] | None = None  # default: every language of the data
    tag_template: str = DEFAULT_TAG
    translate_fields: Sequence[str] = TRANSLATE_FIELDS
    language_names: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 0:
            raise CrossInError(f"size: must be an integer >= 0, got {self.size!r}")
        self.proportions = validate_proportions(self.proportions)
        if "{language}" not in self.tag_template:
            raise CrossInError(
                f"tag_template: must contain {{language}}, got {self.tag_template!r}"
            )
        bad = [f for f in self.translate_fields if f not in TRANSLATE_FIELDS]
        if bad or not self.translate_fields:
            raise CrossInError(
                f"translate_fields: choose from {', '.join(TRANSLATE_FIELDS)}, got {list(self.translate_fields)}"
            )

    def name(self, lang: str) -> str:
        names = {**LANGUAGE_NAMES, **self.language_names}
        if lang not in names:
            raise CrossInError(
                f"language_names: no name for language code {lang!r}; pass one "
                f"(--language-names {lang}=Name)"
            )
        return names[lang]

    def tag(self, lang: str) -> str:
        return self.tag_template.format(language=self.name(lang))


def parse_proportions(text: str) -> dict[str, float]:
    """``"en2x=0.3,x2en=0.2"`` -> ``{"en2x": 0.3, "x2en": 0.2}`` (validated by the config)."""
    out: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        mode, sep, value = part.partition("=")
        mode = mode.strip()
        if not sep:
            raise CrossInError(f"proportions: expected mode=fraction, got {part!r}")
        if mode in out:
            raise CrossInError(f"proportions: {mode!r} given twice")
        try:
            out[mode] = float(value)
        except ValueError:
            raise CrossInError(f"proportions: {mode}={value!r} is not a number") from None
    return out


def validate_proportions(proportions: Mapping[str, float]) -> dict[str, float]:
    """Known modes, finite non-negative fractions summing to 1 (within 1e-6); missing -> 0."""
    unknown = sorted(set(proportions) - set(MODES))
    if unknown:
        raise CrossInError(f"proportions: unknown mode(s) {unknown}; known: {', '.join(MODES)}")
    out = {mode: float(proportions.get(mode, 0.0)) for mode in MODES}
    for mode, value in out.items():
        if not math.isfinite(value) or value < 0:
            raise CrossInError(f"proportions: {mode} must be a fraction >= 0, got {value}")
    total = sum(out.values())
    if not math.isclose(total, 1.0, abs_tol=1e-6):
        given = ", ".join(f"{m}={v:g}" for m, v in out.items() if v)
        raise CrossInError(f"proportions: must sum to 1, got {total:g} ({given or 'none'})")
    return out


def mode_counts(size: int, proportions: Mapping[str, float]) -> dict[str, int]:
    """Rows per mode: floor of size x fraction, the rest to the largest remainders (then mode order)."""
    raw = {mode: size * proportions.get(mode, 0.0) for mode in MODES}
    counts = {mode: math.floor(value) for mode, value in raw.items()}
    left = size - sum(counts.values())
    by_remainder = sorted(MODES, key=lambda m: (-(raw[m] - counts[m]), MODES.index(m)))
    for mode in by_remainder[:left]:
        counts[mode] += 1
    return counts


def group_items(rows: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Mapping[str, Any]]]:
    """id -> lang -> row, in first-seen order; a repeated (id, lang) is an error."""
    items: dict[str, dict[str, Mapping[str, Any]]] = {}
    for row in rows:
        by_lang = items.setdefault(str(row["id"]), {})
        if row["lang"] in by_lang:
            raise CrossInError(f"item {row['id']!r}: two rows in language {row['lang']!r}")
        by_lang[row["lang"]] = row
    return items


class _Space:
    """Candidates of one mode, indexed without materialising them: item i owns a contiguous
    block of ``sizes[i]`` indices (prefix sums + bisect decode an index)."""

    def __init__(self, sizes: Sequence[int]) -> None:
        self.ends: list[int] = []
        total = 0
        for n in sizes:
            total += n
            self.ends.append(total)
        self.total = total

    def decode(self, index: int) -> tuple[int, int]:
        item = bisect.bisect_right(self.ends, index)
        start = self.ends[item - 1] if item else 0
        return item, index - start


def _draw(rng: random.Random, total: int, count: int) -> list[int]:
    """``count`` indices from ``range(total)``: without replacement, cycling when count > total."""
    out: list[int] = []
    while count > 0:
        take = min(count, total)
        out += rng.sample(range(total), take)
        count -= take
    return out


def build_crossin(rows: Iterable[Mapping[str, Any]], config: CrossInConfig) -> list[dict[str, str]]:
    """The mixture as plain rows with ``COLUMNS`` (shuffled, deterministic by seed)."""
    items = group_items(rows)
    found = sorted({lang for by_lang in items.values() for lang in by_lang})
    languages = sorted(config.languages) if config.languages is not None else found
    missing = [lang for lang in languages if lang not in found]
    if missing:
        raise CrossInError(f"languages: no rows in {missing} (data has {found})")
    pivot = config.pivot
    others = [lang for lang in languages if lang != pivot]
    counts = mode_counts(config.size, config.proportions)
    if pivot not in languages and any(counts[m] for m in ("en2x", "x2en", "translate")):
        raise CrossInError(f"pivot: {pivot!r} is not among the languages {languages}")
    if not others and config.size:
        raise CrossInError(f"languages: need at least one language besides the pivot {pivot!r}")
    for lang in languages:
        config.name(lang)  # fail early on a language without a name

    ids = list(items)
    avail = [[lang for lang in others if lang in items[i]] for i in ids]
    has_pivot = [pivot in items[i] for i in ids]
    n_fields = len(config.translate_fields)
    sizes = {
        "en2x": [len(a) if p else 0 for a, p in zip(avail, has_pivot, strict=True)],
        "x2en": [len(a) if p else 0 for a, p in zip(avail, has_pivot, strict=True)],
        "x2x": [len(a) ** 2 for a in avail],
        "translate": [
            2 * n_fields * len(a) if p else 0 for a, p in zip(avail, has_pivot, strict=True)
        ],
    }
    rng = random.Random(config.seed)
    out: list[dict[str, str]] = []
    for mode in MODES:
        if not counts[mode]:
            continue
        space = _Space(sizes[mode])
        if space.total == 0:
            raise CrossInError(
                f"proportions: {mode} wants {counts[mode]} rows but the data has no {mode} candidates"
            )
        for index in _draw(rng, space.total, counts[mode]):
            item, k = space.decode(index)
            out.append(_render(mode, ids[item], items[ids[item]], avail[item], k, pivot, config))
    rng.shuffle(out)
    return out


def _render(
    mode: str,
    item_id: str,
    by_lang: Mapping[str, Mapping[str, Any]],
    others: Sequence[str],
    k: int,
    pivot: str,
    config: CrossInConfig,
) -> dict[str, str]:
    """Row number ``k`` of ``mode``'s candidate block for one item."""
    if mode == "en2x":
        src, tgt = pivot, others[k]
    elif mode == "x2en":
        src, tgt = others[k], pivot
    elif mode == "x2x":
        src, tgt = others[k // len(others)], others[k % len(others)]
    else:
        n = len(others)
        direction, rest = divmod(k, len(config.translate_fields) * n)
        fld, x = divmod(rest, n)
        src, tgt = (pivot, others[x]) if direction == 0 else (others[x], pivot)
        name = config.translate_fields[fld]
        prompt = TRANSLATE_TEMPLATE.format(language=config.name(tgt), text=by_lang[src][name])
        return _row(item_id, mode, src, tgt, prompt, by_lang[tgt][name], config)
    return _row(
        item_id, mode, src, tgt, by_lang[src]["instruction"], by_lang[tgt]["response"], config
    )


def _row(
    item_id: str, mode: str, src: str, tgt: str, prompt: str, response: str, config: CrossInConfig
) -> dict[str, str]:
    return {
        "id": item_id,
        "lang": tgt,
        "instruction": f"{prompt}\n{config.tag(tgt)}",
        "response": response,
        "mode": mode,
        "src_lang": src,
        "tgt_lang": tgt,
    }


def to_dataset(rows: Sequence[Mapping[str, str]]):
    """A ``datasets.Dataset`` with exactly ``COLUMNS`` (string features, also when empty)."""
    import datasets

    features = datasets.Features({c: datasets.Value("string") for c in COLUMNS})
    return datasets.Dataset.from_dict({c: [r[c] for r in rows] for c in COLUMNS}, features=features)


def build_crossin_dataset(rows: Iterable[Mapping[str, Any]], config: CrossInConfig):
    return to_dataset(build_crossin(rows, config))


def summarize(rows: Sequence[Mapping[str, str]]) -> dict[str, Any]:
    """Counts per mode and per (mode, src->tgt) pair, for the CLI and summary.json."""
    per_mode = Counter(r["mode"] for r in rows)
    pairs = Counter((r["mode"], f"{r['src_lang']}->{r['tgt_lang']}") for r in rows)
    by_mode: dict[str, dict[str, int]] = {}
    for (mode, pair), n in sorted(pairs.items()):
        by_mode.setdefault(mode, {})[pair] = n
    return {
        "total": len(rows),
        "modes": {m: per_mode.get(m, 0) for m in MODES},
        "pairs": by_mode,
        "output_languages": dict(sorted(Counter(r["lang"] for r in rows).items())),
    }


def write_outputs(
    rows: Sequence[Mapping[str, str]], out: str | Path, meta: Mapping[str, Any]
) -> Path:
    """OUT/crossin.jsonl, OUT/dataset (save_to_disk), OUT/summary.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "crossin.jsonl").open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(dict(row), ensure_ascii=False) + "\n")
    to_dataset(rows).save_to_disk(str(out / "dataset"))
    summary = {**meta, **summarize(rows)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    return out


def _names(text: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in (p for p in (text or "").split(",") if p.strip()):
        code, sep, name = part.partition("=")
        if not sep or not code.strip() or not name.strip():
            raise CrossInError(f"language_names: expected code=Name, got {part!r}")
        out[code.strip()] = name.strip()
    return out


@run_cli
def main(argv: Sequence[str] | None = None) -> int:
    """prepare-data: build the mixture, write it, print counts per mode and language pair."""
    parser = argparse.ArgumentParser(
        prog="python -m data.crossin", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--source",
        required=True,
        help="JSONL file/dir, builtin:polyglot?items=N, or a datasets source",
    )
    parser.add_argument(
        "--out",
        required=True,
        help="output directory (crossin.jsonl, a saved dataset, summary.json)",
    )
    parser.add_argument(
        "--size", type=bounded_int(1, 10**8), required=True, help="total rows of the mixture"
    )
    parser.add_argument(
        "--proportions",
        default="en2x=0.3,x2en=0.2,x2x=0.3,translate=0.2",
        help=f"MODE=FRACTION,... over the modes {', '.join(MODES)}; they sum to 1 "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--seed", type=bounded_int(0, 2**32 - 1), default=0, help="seed of the sampling (default 0)"
    )
    parser.add_argument(
        "--pivot", default="en", help="the pivot language of en2x/x2en (default en)"
    )
    parser.add_argument(
        "--languages",
        default=None,
        help="comma-separated languages to keep (default: all in the data)",
    )
    parser.add_argument(
        "--tag-template",
        default=DEFAULT_TAG,
        help="instruction prefix naming the answer language, {language} "
        "replaced by its name (default %(default)r)",
    )
    parser.add_argument("--translate-fields", default=",".join(TRANSLATE_FIELDS),
                        help="row fields the translate mode pairs (default %(default)s)")  # fmt: skip
    parser.add_argument(
        "--language-names", default=None, help="code=Name,... for codes without a built-in name"
    )
    args = parser.parse_args(argv)

    from data.sources import DataError, load_rows

    languages = (
        [x.strip() for x in args.languages.split(",") if x.strip()] if args.languages else None
    )
    try:
        config = CrossInConfig(
            size=args.size,
            proportions=parse_proportions(args.proportions),
            seed=args.seed,
            pivot=args.pivot,
            languages=languages,
            tag_template=args.tag_template,
            translate_fields=[x.strip() for x in args.translate_fields.split(",") if x.strip()],
            language_names=_names(args.language_names),
        )
        rows, report = load_rows(args.source)
        if languages is not None:
            rows = [r for r in rows if r["lang"] in set(languages)]
        mixed = build_crossin(rows, config)
    except (CrossInError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    meta = {"source": args.source, "seed": args.seed, "size": args.size,
            "proportions": config.proportions, "tag_template": config.tag_template}  # fmt: skip
    out = write_outputs(mixed, args.out, meta)
    summary = summarize(mixed)
    print(f"{'mode':<10} {'rows':>6}")
    for mode in MODES:
        print(f"{mode:<10} {summary['modes'][mode]:>6}")
    print("\nmode       pair         rows")
    for mode, pairs in summary["pairs"].items():
        for pair, n in pairs.items():
            print(f"{mode:<10} {pair:<12} {n:>4}")
    print(f"\nwrote {len(mixed)} rows from {report.kept} source rows to {out / 'crossin.jsonl'} "
          f"and {out / 'dataset'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
