"""Load instruction rows from JSON Lines files, directories, the built-in set or ``datasets``.

Every source ends up as rows ``{"lang", "instruction", "response", "id"}`` of non-empty
strings (plus ``messages`` for a multi-turn conversation; the formats are in `data.rows`), so
training code never has to guess a schema.  JSON Lines is parsed here rather than
through ``datasets`` so that a bad record can be reported as ``file:line``; a fine-tuning run
that dies on row 40 000 of a converted corpus should say exactly where to look.

Source forms accepted by :func:`load_rows`:

* ``path/to/file.jsonl``, or ``.json``: one JSON array of rows (alpaca's layout) or JSON Lines;
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
from data.rows import FIELD_NAMES, FORMATS, BadRow, columns, detect_format, normalise

__all__ = ["BadRow", "DataError", "LoadReport", "jsonl_records", "load_rows"]
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


# A record stream yields (location for messages, parsed record or the parse failure).
Records = Iterator[tuple[str, Any]]


def load_rows(
    source: str | os.PathLike,
    *,
    fields: Mapping[str, str] | None = None,
    language: str | None = None,
    format: str = "auto",
    on_bad_row: Literal["error", "skip"] = "error",
    split: str = "train",
    limit: int | None = None,
) -> tuple[list[dict[str, Any]], LoadReport]:
    """Read and validate instruction rows from ``source`` (see the module docstring for forms).

    ``format`` is one of `data.rows.FORMATS`; ``auto`` picks it from the first JSON object.
    ``fields`` maps canonical names (lang/instruction/input/response/messages/id) to the
    source's column names.  ``language`` fills ``lang`` only for rows that have none.  A missing ``id`` becomes the
    0-based position of the record in the source, counting rejected records too, so ids do not
    shift when bad rows are skipped.  ``limit`` stops reading after that many valid rows.
    """
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    name = os.fspath(source)
    if format not in FORMATS:
        raise DataError(f"{name}: unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    mapping = _field_names(name, fields)
    fmt = None if format == "auto" else format
    guessed = False  # the format was the fallback of `auto`: say so in the first row's error
    if language is not None and (not isinstance(language, str) or not language.strip()):
        raise DataError(f"{name}: language must be a non-empty string, got {language!r}")

    report = LoadReport(source=name)
    rows: list[dict[str, Any]] = []
    if limit == 0:
        return rows, report
    for index, (where, record) in enumerate(_records(name, split)):
        try:
            if isinstance(record, BadRow):
                raise record
            if fmt is None and isinstance(record, Mapping):  # the first JSON object decides
                found, mapping = detect_format(record, mapping)
                fmt, guessed = found or "instruction", found is None
            layout = fmt or "instruction"
            row = normalise(record, index, layout, columns(layout, mapping), language)
        except BadRow as bad:
            if guessed and not bad.detail:  # the first row of a source of unknown layout
                known = ", ".join(FORMATS[1:])
                bad.detail = f"no known format in the first row; set the source's format ({known})"
            guessed = False
            if on_bad_row == "error":
                raise DataError(f"{where}: {bad}") from None
            report.skipped += 1
            report.reasons[bad.reason] = report.reasons.get(bad.reason, 0) + 1
            continue
        guessed = False
        rows.append(row)
        report.kept += 1
        if limit is not None and len(rows) >= limit:
            break
    return rows, report


def _field_names(source: str, fields: Mapping[str, str] | None) -> dict[str, str]:
    for canon, column in (fields or {}).items():
        if canon not in FIELD_NAMES:
            raise DataError(
                f"{source}: unknown field {canon!r} in fields mapping; "
                f"expected some of {', '.join(FIELD_NAMES)}"
            )
        if not isinstance(column, str) or not column:
            raise DataError(f"{source}: fields[{canon!r}] must be a non-empty string")
    return dict(fields or {})


# --------------------------------------------------------------------------------------------
# Record streams
# --------------------------------------------------------------------------------------------


def _records(source: str, split: str) -> Records:
    if source.startswith(BUILTIN_PREFIX):
        return _builtin_records(source)
    path = Path(source).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".json" and _starts_with_bracket(path):
            return json_array_records(path)
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


def _starts_with_bracket(path: Path) -> bool:
    """Whether a ``.json`` file is one JSON array (alpaca's layout) rather than JSON Lines."""
    with path.open("rb") as fh:
        chunk = fh.read(65536).removeprefix(b"\xef\xbb\xbf")
        while chunk:
            stripped = chunk.lstrip(b" \t\r\n")
            if stripped:
                return stripped[:1] == b"["
            chunk = fh.read(65536)
    return False


_WHITESPACE = " \t\r\n"


def json_array_records(path: Path) -> Records:
    """(``file:line`` of the element's start, element) for a file holding one JSON array.

    An element that is not valid JSON leaves no way to find where the next one starts, so
    that is an error for the whole source even under ``on_bad_row: skip``.
    """
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: invalid UTF-8 ({exc})") from None
    decoder = json.JSONDecoder()
    line, counted = 1, 0

    def skip(pos: int) -> int:
        while pos < len(text) and text[pos] in _WHITESPACE:
            pos += 1
        return pos

    def where(pos: int) -> str:
        nonlocal line, counted
        line += text.count("\n", counted, pos)
        counted = pos
        return f"{path}:{line}"

    pos = skip(skip(0) + 1)  # past "["
    if text[pos : pos + 1] == "]":
        pos = skip(pos + 1)
    else:
        while True:
            try:
                record, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})"
                ) from None
            yield where(pos), record
            pos = skip(end)
            if text[pos : pos + 1] == ",":
                pos = skip(pos + 1)
                continue
            if text[pos : pos + 1] == "]":
                pos = skip(pos + 1)
                break
            raise DataError(f"{where(pos)}: invalid JSON (expected ',' or ']' in the array)")
    if pos < len(text):
        raise DataError(
            f"{where(pos)}: text after the JSON array (a .json file is one array of rows "
            "or JSON Lines, one object per line)"
        )


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
