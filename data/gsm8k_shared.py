"""The shared GSM8K data as parallel items, split into train and held-out by question hash.

``../shared/data`` holds GSM8K questions translated into seven languages
(``parallel/gsm8k_questions/{lang}.jsonl``: lang, en, target) and the English worked answers
(``instruct/gsm8k_en.jsonl``). The files are not in the same order (and not every question is in
every file), so items are joined by the English question text.

Split: an item is held out when the first 8 hex digits of SHA-256 of its English question, read
as an integer, fall below ``heldout_fraction * 2**32`` (default 0.2). Deterministic, independent
of file order and of the languages asked for, so every run, seed and method sees the same split
and no run trains on a held-out question.

A "translation" equal to its English question is not one (the shared fr file has 94 of 2000,
de 12, es 11, zh 10, sw 3): it is dropped, so the item lacks that language. Kept, it would be an
English sentence labelled fr, which detection rightly calls English and the gap scores as 0.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from config.errors import UserError

PARALLEL_DIR = Path("parallel") / "gsm8k_questions"
ANSWERS_FILE = Path("instruct") / "gsm8k_en.jsonl"
HELDOUT_FRACTION = 0.2


@dataclass
class Item:
    id: str  # the question hash (hex)
    en: str  # English question
    answer: str  # English worked answer (final answer after ####)
    questions: dict[str, str] = field(default_factory=dict)  # lang -> translated question


def question_id(en: str) -> str:
    return hashlib.sha256(en.strip().encode("utf-8")).hexdigest()[:16]


def is_heldout(en: str, fraction: float = HELDOUT_FRACTION) -> bool:
    """The documented split (module docstring)."""
    return int(question_id(en)[:8], 16) < fraction * 2**32


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise UserError(f"{path}: no such file (is --data-dir the shared data folder?)")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{n}: not JSON ({exc.msg})") from None
    return rows


def load_items(
    data_dir: Path, languages: list[str], *, split: str, fraction: float = HELDOUT_FRACTION
) -> list[Item]:
    """Items of ``split`` ("train" | "heldout") translated into every non-English language
    asked for and with an English answer, ordered by id (deterministic)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be train or heldout, got {split!r}")
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"{data_dir}: the shared data folder does not exist (give --data-dir)")
    answers = {}
    for n, row in enumerate(_jsonl(data_dir / ANSWERS_FILE), start=1):
        if not isinstance(row.get("instruction"), str) or not isinstance(row.get("response"), str):
            raise UserError(f"{data_dir / ANSWERS_FILE}:{n}: needs instruction and response")
        answers[row["instruction"].strip()] = row["response"]
    targets: dict[str, dict[str, str]] = {}
    for lang in languages:
        if lang == "en":
            continue
        path = data_dir / PARALLEL_DIR / f"{lang}.jsonl"
        for n, row in enumerate(_jsonl(path), start=1):
            if not isinstance(row.get("en"), str) or not isinstance(row.get("target"), str):
                raise UserError(f"{path}:{n}: needs en and target")
            if row["target"].strip() == row["en"].strip():
                continue  # left untranslated (see the module docstring)
            targets.setdefault(row["en"].strip(), {})[lang] = row["target"]
    wanted = [lang for lang in languages if lang != "en"]
    items = []
    for en, answer in answers.items():
        questions = targets.get(en, {})
        if all(lang in questions for lang in wanted) and (
            is_heldout(en, fraction) == (split == "heldout")
        ):
            items.append(
                Item(question_id(en), en, answer, {lang: questions[lang] for lang in wanted})
            )
    return sorted(items, key=lambda item: item.id)


def training_rows(items: list[Item], languages: list[str]) -> list[dict]:
    """Instruction rows: the question in each language, the English worked answer."""
    rows = []
    for item in items:
        for lang in languages:
            question = item.en if lang == "en" else item.questions[lang]
            rows.append(
                {"id": item.id, "lang": lang, "instruction": question, "response": item.answer}
            )
    return rows


def pair_rows(items: list[Item], languages: list[str]) -> list[dict]:
    """Parallel {lang, en, target} rows for the contrastive pairs."""
    return [
        {"id": item.id, "lang": lang, "en": item.en, "target": item.questions[lang]}
        for item in items
        for lang in languages
        if lang != "en"
    ]
