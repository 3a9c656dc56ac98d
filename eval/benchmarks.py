"""Benchmark files (XCOPA, MGSM, parallel pairs, plain text) read and validated row by row.

Like ``data/sources.py``, JSON Lines are parsed here so that a bad row is reported as
``file:line: field "label" must be 0 or 1`` instead of a KeyError deep inside an evaluation
that ran for an hour. Layout of the shared data folder (``../shared/data`` beside the repo,
or ``POLYSHIFT_SHARED_DATA``): ``xcopa/{lang}.jsonl``, ``mgsm/{lang}.jsonl``,
``parallel/gsm8k_questions/{lang}.jsonl``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from data.sources import BadRow, jsonl_records
from eval.answers import parse_gold

ROOT = Path(__file__).resolve().parent.parent
DATA_ENV = "POLYSHIFT_SHARED_DATA"
TASK_FILES: dict[str, str] = {
    "xcopa": "xcopa/{lang}.jsonl",
    "mgsm": "mgsm/{lang}.jsonl",
    "bitext": "parallel/gsm8k_questions/{lang}.jsonl",
    "ppl": "parallel/gsm8k_questions/{lang}.jsonl",
}

T = TypeVar("T")


class BenchmarkError(ValueError):
    """A benchmark file or row is unusable; the message starts with ``file:line``."""


class MissingBenchmark(BenchmarkError):
    """No file for this task and language (callers may skip the language)."""


@dataclass(frozen=True)
class XcopaRow:
    lang: str
    premise: str
    choice1: str
    choice2: str
    question: str  # "cause" or "effect"
    label: int  # 0: choice1 is right, 1: choice2
    idx: int  # the row's idx field (aligns languages), else its position in the file

    @property
    def choices(self) -> tuple[str, str]:
        return (self.choice1, self.choice2)


@dataclass(frozen=True)
class MgsmRow:
    lang: str
    question: str
    answer: float
    idx: int  # position in the file: MGSM files hold the same problems in the same order


@dataclass(frozen=True)
class ParallelPair:
    lang: str
    en: str
    target: str


def shared_data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The benchmark folder: the explicit path, else $POLYSHIFT_SHARED_DATA, else ../shared/data."""
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get(DATA_ENV)
    return Path(env).expanduser() if env else ROOT.parent / "shared" / "data"


def benchmark_file(data_dir: str | os.PathLike, task: str, lang: str) -> Path:
    """Path of ``task``'s file for ``lang``; a clear error names the languages that exist."""
    if task not in TASK_FILES:
        raise BenchmarkError(f"unknown task {task!r}; known: {', '.join(TASK_FILES)}")
    pattern = TASK_FILES[task]
    path = Path(data_dir) / pattern.format(lang=lang)
    if not path.is_file():
        folder = path.parent
        have = sorted(p.stem for p in folder.glob("*.jsonl")) if folder.is_dir() else []
        hint = f"available: {', '.join(have)}" if have else f"{folder} has no .jsonl files"
        raise MissingBenchmark(f"{path}: no {task} data for language {lang!r} ({hint})")
    return path


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """(``file:line``, 0-based record position, object) for every non-blank line."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"{path}: no such file")
    for position, (where, record) in enumerate(jsonl_records([path])):
        if isinstance(record, BadRow):
            raise BenchmarkError(f"{where}: {record}")
        if not isinstance(record, dict):
            raise BenchmarkError(f"{where}: line is not a JSON object")
        yield where, position, record


def _text(where: str, record: dict[str, Any], name: str) -> str:
    if name not in record:
        raise BenchmarkError(f'{where}: missing field "{name}"')
    value = record[name]
    if not isinstance(value, str) or not value.strip():
        raise BenchmarkError(f'{where}: field "{name}" must be a non-empty string, got {value!r}')
    return value


def _lang(where: str, record: dict[str, Any], default: str) -> str:
    if record.get("lang") is None:
        return default
    return _text(where, record, "lang")


def _load(
    path: str | os.PathLike,
    parse: Callable[[str, int, dict[str, Any]], T],
    limit: int | None,
) -> list[T]:
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    rows: list[T] = []
    if limit == 0:
        return rows
    for where, position, record in read_jsonl(path):
        rows.append(parse(where, position, record))
        if limit is not None and len(rows) >= limit:
            break
    return rows


def load_xcopa(path: str | os.PathLike, limit: int | None = None) -> list[XcopaRow]:
    """XCOPA rows: premise, choice1, choice2, question (cause/effect), label (0/1)."""
    default_lang = Path(path).stem

    def parse(where: str, position: int, r: dict[str, Any]) -> XcopaRow:
        premise, c1, c2 = (_text(where, r, k) for k in ("premise", "choice1", "choice2"))
        question = r.get("question")
        if question not in ("cause", "effect"):
            if "question" not in r:
                raise BenchmarkError(f'{where}: missing field "question"')
            raise BenchmarkError(
                f'{where}: field "question" must be "cause" or "effect", got {question!r}'
            )
        if "label" not in r:
            raise BenchmarkError(f'{where}: missing field "label"')
        label = r["label"]
        if isinstance(label, bool) or label not in (0, 1):
            raise BenchmarkError(f'{where}: field "label" must be 0 or 1, got {label!r}')
        idx = r.get("idx", position)
        if isinstance(idx, bool) or not isinstance(idx, int):
            raise BenchmarkError(f'{where}: field "idx" must be an integer, got {idx!r}')
        lang = _lang(where, r, default_lang)
        return XcopaRow(lang, premise, c1, c2, question, int(label), idx)

    return _load(path, parse, limit)


def load_mgsm(path: str | os.PathLike, limit: int | None = None) -> list[MgsmRow]:
    """MGSM rows: question and a numeric answer (number or numeric string such as "1,250")."""
    default_lang = Path(path).stem

    def parse(where: str, position: int, r: dict[str, Any]) -> MgsmRow:
        question = _text(where, r, "question")
        if "answer" not in r:
            raise BenchmarkError(f'{where}: missing field "answer"')
        try:
            answer = parse_gold(r["answer"])
        except ValueError:
            raise BenchmarkError(
                f'{where}: field "answer" must be a number, got {r["answer"]!r}'
            ) from None
        return MgsmRow(_lang(where, r, default_lang), question, answer, position)

    return _load(path, parse, limit)


def load_parallel(path: str | os.PathLike, limit: int | None = None) -> list[ParallelPair]:
    """Parallel pairs: ``en`` (the pivot text) and ``target``."""
    default_lang = Path(path).stem

    def parse(where: str, position: int, r: dict[str, Any]) -> ParallelPair:
        en, target = _text(where, r, "en"), _text(where, r, "target")
        return ParallelPair(_lang(where, r, default_lang), en, target)

    return _load(path, parse, limit)


def load_texts(path: str | os.PathLike, field: str, limit: int | None = None) -> list[str]:
    """One text field of every row (perplexity corpora)."""

    def parse(where: str, position: int, r: dict[str, Any]) -> str:
        return _text(where, r, field)

    return _load(path, parse, limit)
