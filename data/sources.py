"""Load instruction rows from JSON Lines files, directories, the built-in set or ``datasets``.

Every source ends up as rows ``{"lang", "instruction", "response", "id"}`` of non-empty
strings, so training code never has to guess a schema.  JSON Lines is parsed here rather than
through ``datasets`` so that a bad record can be reported as ``file:line``; a fine-tuning run
that dies on row 40 000 of a converted corpus should say exactly where to look.

Source forms accepted by :func:`load_rows`:

* ``path/to/file.jsonl`` (or ``.json``, also read as JSON Lines);
* a directory holding ``*.jsonl`` files (sorted by name and concatenated);
* ``builtin:polyglot`` with optional ``?items=N&seed=S&languages=en,fr``;
* a local ``.csv``/``.tsv``/``.parquet``/``.arrow`` file, a directory written by
  ``Dataset.save_to_disk``, or anything else ``datasets.load_dataset`` accepts (a local
  dataset directory or a hub id).  Hub ids only work if already cached when offline.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

from config.errors import UserError
from data.polyglot import build_polyglot

CANONICAL_FIELDS: tuple[str, ...] = ("lang", "instruction", "response", "id")
JSONL_SUFFIXES: tuple[str, ...] = (".jsonl", ".json")
BUILTIN_PREFIX = "builtin:"
BUILTIN_DEFAULT_ITEMS = 500

# Local files handed to a ``datasets`` packaged builder (load_dataset cannot take a bare file).
_DATASETS_BUILDERS: dict[str, tuple[str, dict[str, Any]]] = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"sep": "\t"}),
    ".parquet": ("parquet", {}),
    ".arrow": ("arrow", {}),
}


class DataError(UserError):
    """A source or one of its rows is unusable; the message names the source and line/row."""


@dataclass
class LoadReport:
    """What :func:`load_rows` kept and why it skipped the rest (reason -> count)."""

    source: str
    kept: int = 0
    skipped: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


class BadRow(Exception):
    """A rejected record; ``reason`` is the stable key counted in :class:`LoadReport`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason} ({self.detail})" if self.detail else self.reason


# A record stream yields (location for messages, parsed record or the parse failure).
Records = Iterator[tuple[str, Any]]


def load_rows(
    source: str | os.PathLike,
    *,
    fields: Mapping[str, str] | None = None,
    language: str | None = None,
    on_bad_row: Literal["error", "skip"] = "error",
    split: str = "train",
    limit: int | None = None,
) -> tuple[list[dict[str, str]], LoadReport]:
    """Read and validate instruction rows from ``source`` (see the module docstring for forms).

    ``fields`` maps canonical names (lang/instruction/response/id) to the source's column names.
    ``language`` fills ``lang`` only for rows that have none.  A missing ``id`` becomes the
    0-based position of the record in the source, counting rejected records too, so ids do not
    shift when bad rows are skipped.  ``limit`` stops reading after that many valid rows.
    """
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    name = os.fspath(source)
    names = _field_names(name, fields)
    if language is not None and (not isinstance(language, str) or not language.strip()):
        raise DataError(f"{name}: language must be a non-empty string, got {language!r}")

    report = LoadReport(source=name)
    rows: list[dict[str, str]] = []
    if limit == 0:
        return rows, report
    for index, (where, record) in enumerate(_records(name, split)):
        try:
            if isinstance(record, BadRow):
                raise record
            row = _normalise(record, index, names, language)
        except BadRow as bad:
            if on_bad_row == "error":
                raise DataError(f"{where}: {bad}") from None
            report.skipped += 1
            report.reasons[bad.reason] = report.reasons.get(bad.reason, 0) + 1
            continue
        rows.append(row)
        report.kept += 1
        if limit is not None and len(rows) >= limit:
            break
    return rows, report


def _field_names(source: str, fields: Mapping[str, str] | None) -> dict[str, str]:
    names = {canon: canon for canon in CANONICAL_FIELDS}
    for canon, column in (fields or {}).items():
        if canon not in names:
            raise DataError(
                f"{source}: unknown field {canon!r} in fields mapping; "
                f"expected some of {', '.join(CANONICAL_FIELDS)}"
            )
        if not isinstance(column, str) or not column:
            raise DataError(f"{source}: fields[{canon!r}] must be a non-empty string")
        names[canon] = column
    return names


def _normalise(
    record: Any, index: int, names: Mapping[str, str], language: str | None
) -> dict[str, str]:
    if not isinstance(record, Mapping):
        raise BadRow("line is not a JSON object", f"got {_json_type(record)}")
    row = {}
    for canon in ("instruction", "response"):
        row[canon] = _text(record, names[canon])
    lang_col = names["lang"]
    if record.get(lang_col) is not None:
        lang = _text(record, lang_col)
    elif language is not None:
        lang = language
    else:
        raise BadRow(f'missing field "{lang_col}"', "and no language given for the source")
    id_col = names["id"]
    raw_id = record.get(id_col)
    if raw_id is None:
        row_id = str(index)
    elif isinstance(raw_id, int) and not isinstance(raw_id, bool):
        row_id = str(raw_id)  # integer ids are common and unambiguous
    else:
        row_id = _text(record, id_col)
    return {"lang": lang, "instruction": row["instruction"], "response": row["response"],
            "id": row_id}  # fmt: skip


def _text(record: Mapping[str, Any], column: str) -> str:
    if column not in record:
        raise BadRow(f'missing field "{column}"')
    value = record[column]
    if not isinstance(value, str):
        raise BadRow(f'field "{column}" is not a string', f"got {_json_type(value)}")
    if not value.strip():
        raise BadRow(f'field "{column}" is empty')
    return value


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__


# --------------------------------------------------------------------------------------------
# Record streams
# --------------------------------------------------------------------------------------------


def _records(source: str, split: str) -> Records:
    if source.startswith(BUILTIN_PREFIX):
        return _builtin_records(source)
    path = Path(source).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in JSONL_SUFFIXES:
            return jsonl_records([path])
        if suffix in _DATASETS_BUILDERS:
            builder, kwargs = _DATASETS_BUILDERS[suffix]
            return _datasets_records(source, split, builder, data_files=str(path), **kwargs)
        return _datasets_records(source, split, str(path))
    if path.is_dir():
        files = sorted(p for p in path.glob("*.jsonl") if p.is_file())
        if files:
            return jsonl_records(files)
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            return _saved_dataset_records(source, path, split)
        return _datasets_records(source, split, str(path))
    local_suffixes = (*JSONL_SUFFIXES, *_DATASETS_BUILDERS)
    looks_local = path.suffix.lower() in local_suffixes or source.startswith(("/", ".", "~"))
    if looks_local:
        raise DataError(f"{source}: no such file or directory")
    return _datasets_records(source, split, source)


def jsonl_records(files: Iterable[Path]) -> Records:
    """(``file:line``, object or `BadRow`) per non-blank line, for exact error locations."""
    for path in files:
        with path.open("rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                where = f"{path}:{lineno}"
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as exc:
                    yield where, BadRow("invalid UTF-8", str(exc))
                    continue
                if not line.strip():
                    continue
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError as exc:
                    yield where, BadRow("invalid JSON", f"{exc.msg} at column {exc.colno}")


def _builtin_records(source: str) -> Records:
    parts = urlsplit(source[len(BUILTIN_PREFIX) :])
    name = parts.path
    if name != "polyglot":
        raise DataError(f"{source}: unknown builtin source {name!r}; available: polyglot")
    query = {key: values[-1] for key, values in parse_qs(parts.query, strict_parsing=False).items()}
    unknown = sorted(set(query) - {"items", "seed", "languages"})
    if unknown:
        raise DataError(
            f"{source}: unknown parameter(s) {', '.join(unknown)}; allowed: items, seed, languages"
        )
    try:
        items = int(query.get("items", BUILTIN_DEFAULT_ITEMS))
        seed = int(query.get("seed", 0))
    except ValueError as exc:
        raise DataError(f"{source}: items and seed must be integers ({exc})") from None
    kwargs: dict[str, Any] = {"seed": seed}
    if "languages" in query:
        kwargs["languages"] = [code for code in query["languages"].split(",") if code]
    try:
        rows = build_polyglot(items, **kwargs)
    except ValueError as exc:
        raise DataError(f"{source}: {exc}") from None
    return ((f"{source}:row {i}", row) for i, row in enumerate(rows, start=1))


def _datasets_records(source: str, split: str, path: str, **kwargs: Any) -> Records:
    import datasets

    try:
        dataset = datasets.load_dataset(path, split=split, **kwargs)
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as exc:
        raise DataError(
            f"{source}: dataset is not available locally and could not be fetched "
            f"(offline or not found): {exc}"
        ) from exc
    except Exception as exc:  # datasets raises many types; all mean "unusable source"
        raise DataError(
            f"{source}: could not be loaded with datasets (split {split!r}): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    return _iterate_dataset(source, split, dataset)


def _saved_dataset_records(source: str, path: Path, split: str) -> Records:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise DataError(f"{source}: could not read saved dataset: {exc}") from exc
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{source}: split {split!r} not found; available: {', '.join(loaded)}")
        loaded = loaded[split]
    return _iterate_dataset(source, split, loaded)


def _iterate_dataset(source: str, split: str, dataset: Iterable[Any]) -> Records:
    for i, record in enumerate(dataset, start=1):
        yield f"{source}[{split}]:row {i}", record
