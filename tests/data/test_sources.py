"""Tests for loading and validating instruction rows."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data.sources import DataError, LoadReport, load_rows

GOOD = {"lang": "en", "instruction": "What is 2 plus 2?", "response": "2 plus 2 equals 4."}


def write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def good_line(**changes) -> str:
    return json.dumps({**GOOD, **changes}, ensure_ascii=False)


def test_reads_jsonl_and_defaults_id(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "a.jsonl",
        [good_line(), "", "   ", good_line(id="x7", lang="sw", response="Jibu.", extra=1)],
    )
    rows, report = load_rows(str(path))
    assert rows == [
        {**GOOD, "id": "0"},
        {"lang": "sw", "instruction": GOOD["instruction"], "response": "Jibu.", "id": "x7"},
    ]
    assert report == LoadReport(source=str(path), kept=2, skipped=0, reasons={})


def test_integer_id_is_accepted(tmp_path: Path) -> None:
    rows, _ = load_rows(write_lines(tmp_path / "a.jsonl", [good_line(id=12)]))
    assert rows[0]["id"] == "12"


BAD_LINES = [
    ("{not json", "invalid JSON"),
    ('["a", "b"]', "line is not a JSON object (got array)"),
    ("42", "line is not a JSON object (got number)"),
    (json.dumps({"lang": "en", "instruction": "q"}), 'missing field "response"'),
    (good_line(response=3), 'field "response" is not a string (got number)'),
    (good_line(instruction=None), 'field "instruction" is not a string (got null)'),
    (good_line(response=""), 'field "response" is empty'),
    (good_line(instruction=" \t "), 'field "instruction" is empty'),
    (good_line(lang=""), 'field "lang" is empty'),
    (good_line(id=True), 'field "id" is not a string (got boolean)'),
    (json.dumps({"instruction": "q", "response": "r"}), 'missing field "lang"'),
]


@pytest.mark.parametrize(("line", "message"), BAD_LINES)
def test_bad_row_error_names_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = write_lines(tmp_path / "data" / "foo.jsonl", [good_line(), "", line, good_line()])
    with pytest.raises(DataError) as info:
        load_rows(str(path))
    assert str(info.value).startswith(f"{path}:3: {message}")


def test_invalid_utf8_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "bin.jsonl"
    path.write_bytes(good_line().encode() + b"\n" + b'{"lang": "\xff"}\n')
    with pytest.raises(DataError, match=r"bin\.jsonl:2: invalid UTF-8"):
        load_rows(path)


def test_skip_mode_counts_reasons(tmp_path: Path) -> None:
    lines = [line for line, _ in BAD_LINES] + [good_line(), good_line(response="")]
    path = write_lines(tmp_path / "mixed.jsonl", lines)
    rows, report = load_rows(str(path), on_bad_row="skip")
    assert len(rows) == 1 and rows[0]["id"] == str(len(BAD_LINES))  # ids keep source positions
    assert report.kept == 1 and report.skipped == len(BAD_LINES) + 1
    assert report.reasons['field "response" is empty'] == 2
    assert report.reasons["invalid JSON"] == 1
    assert report.reasons["line is not a JSON object"] == 2
    assert sum(report.reasons.values()) == report.skipped


def test_fields_mapping_and_language_fill(tmp_path: Path) -> None:
    record = {"question": "Habari?", "answer": "Nzuri.", "uid": 5}
    path = write_lines(tmp_path / "sw.jsonl", [json.dumps(record)])
    fields = {"instruction": "question", "response": "answer", "id": "uid"}
    rows, _ = load_rows(str(path), fields=fields, language="sw")
    assert rows == [{"lang": "sw", "instruction": "Habari?", "response": "Nzuri.", "id": "5"}]

    # A row's own lang wins over the fill-in; the mapped name appears in errors.
    path2 = write_lines(tmp_path / "b.jsonl", [json.dumps({**record, "lang": "fr"})])
    assert load_rows(str(path2), fields=fields, language="sw")[0][0]["lang"] == "fr"
    with pytest.raises(DataError, match=r'b\.jsonl:1: missing field "response_text"'):
        load_rows(str(path2), fields={**fields, "response": "response_text"})
    with pytest.raises(DataError, match="unknown field 'answer'"):
        load_rows(str(path2), fields={"answer": "answer"})


def test_limit_keeps_first_valid_rows(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "a.jsonl", ["oops", *[good_line(id=str(i)) for i in range(5)]])
    rows, report = load_rows(str(path), on_bad_row="skip", limit=2)
    assert [r["id"] for r in rows] == ["0", "1"] and report.skipped == 1
    assert load_rows(str(path), limit=0)[0] == []


def test_directory_source_is_sorted_and_concatenated(tmp_path: Path) -> None:
    write_lines(tmp_path / "d" / "b.jsonl", [good_line(id="b1")])
    write_lines(tmp_path / "d" / "a.jsonl", [good_line(id="a1"), good_line(id="a2")])
    write_lines(tmp_path / "d" / "notes.txt", ["ignored"])
    rows, report = load_rows(str(tmp_path / "d"))
    assert [r["id"] for r in rows] == ["a1", "a2", "b1"] and report.kept == 3

    write_lines(tmp_path / "d" / "c.jsonl", [good_line(), "[1]"])
    with pytest.raises(DataError, match=r"c\.jsonl:2: line is not a JSON object"):
        load_rows(str(tmp_path / "d"))


def test_missing_local_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        load_rows(str(tmp_path / "absent.jsonl"))


def test_builtin_source_with_query() -> None:
    rows, report = load_rows("builtin:polyglot?items=3&seed=2&languages=en,sw")
    assert len(rows) == 6 and report.kept == 6
    assert [r["lang"] for r in rows] == ["en", "sw"] * 3
    assert set(rows[0]) == {"lang", "instruction", "response", "id"}
    default, _ = load_rows("builtin:polyglot", limit=10)
    assert len(default) == 10
    other_seed, _ = load_rows("builtin:polyglot?items=3&seed=3&languages=en,sw")
    assert other_seed != rows


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("builtin:nope", "unknown builtin"),
        ("builtin:polyglot?colour=1", "unknown parameter"),
        ("builtin:polyglot?items=x", "must be integers"),
        ("builtin:polyglot?languages=en,xx", "'xx'"),
    ],
)
def test_builtin_errors(source: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        load_rows(source)


@pytest.fixture
def datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import datasets

    cache = tmp_path / "hf_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def test_datasets_csv_source(tmp_path: Path, datasets_cache: Path) -> None:
    path = tmp_path / "qa.csv"
    path.write_text("question,answer\nBonjour ?,Salut.\nÇa va ?,\n", encoding="utf-8")
    fields = {"instruction": "question", "response": "answer"}
    with pytest.raises(DataError, match=r"qa\.csv\[train\]:row 2: field \"answer\""):
        load_rows(str(path), fields=fields, language="fr")
    rows, report = load_rows(str(path), fields=fields, language="fr", on_bad_row="skip")
    assert rows == [{"lang": "fr", "instruction": "Bonjour ?", "response": "Salut.", "id": "0"}]
    assert report.skipped == 1
    assert datasets_cache.exists()  # went through the datasets library, into our cache


def test_datasets_parquet_and_saved_dataset(tmp_path: Path, datasets_cache: Path) -> None:
    import datasets

    ds = datasets.Dataset.from_list([{**GOOD, "id": "p1"}, {**GOOD, "id": "p2"}])
    ds.to_parquet(str(tmp_path / "rows.parquet"))
    rows, _ = load_rows(str(tmp_path / "rows.parquet"))
    assert [r["id"] for r in rows] == ["p1", "p2"]

    datasets.DatasetDict({"train": ds, "test": ds.select([1])}).save_to_disk(tmp_path / "saved")
    rows, _ = load_rows(str(tmp_path / "saved"), split="test")
    assert [r["id"] for r in rows] == ["p2"]
    with pytest.raises(DataError, match="split 'dev' not found"):
        load_rows(str(tmp_path / "saved"), split="dev")


def test_missing_hub_dataset_offline(monkeypatch: pytest.MonkeyPatch, datasets_cache: Path) -> None:
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # The libraries read these at import time; mirror them so the test never touches a network.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"nobody/no-such-dataset.*not available locally"):
        load_rows("nobody/no-such-dataset")


def test_bad_arguments(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "a.jsonl", [good_line()])
    with pytest.raises(ValueError, match="on_bad_row"):
        load_rows(str(path), on_bad_row="ignore")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="limit"):
        load_rows(str(path), limit=-1)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    n_lines=st.integers(min_value=1, max_value=8),
    bad_at=st.integers(min_value=0, max_value=7),
    cut=st.integers(min_value=1, max_value=40),
)
def test_truncated_line_is_located(tmp_path: Path, n_lines: int, bad_at: int, cut: int) -> None:
    """Truncating any one line anywhere is reported at that line, or skipped and counted."""
    bad_at %= n_lines
    lines = [good_line(id=str(i)) for i in range(n_lines)]
    lines[bad_at] = lines[bad_at][: min(cut, len(lines[bad_at]) - 1)]
    path = write_lines(tmp_path / f"fuzz-{n_lines}-{bad_at}-{cut}.jsonl", lines)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:{bad_at + 1}: invalid JSON"):
        load_rows(str(path))
    rows, report = load_rows(str(path), on_bad_row="skip")
    assert report.skipped == 1 and report.kept == n_lines - 1
    assert [r["id"] for r in rows] == [str(i) for i in range(n_lines) if i != bad_at]
