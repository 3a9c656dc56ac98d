"""Tests for the built-in parallel instruction set."""

from __future__ import annotations

import json
import re
from collections import defaultdict

import pytest

from data.polyglot import (
    COLOURS,
    LANGUAGES,
    OBJECTS,
    PEOPLE,
    _ru_count,
    build_polyglot,
    main,
    parallel_pairs,
    write_jsonl,
)

N = 60


@pytest.fixture(scope="module")
def rows() -> list[dict[str, str]]:
    return build_polyglot(N, seed=1)


def test_languages_constant() -> None:
    assert LANGUAGES[0] == "en"
    assert {"fr", "de", "es", "zh", "sw"} <= set(LANGUAGES)


def test_shape_order_and_fields(rows: list[dict[str, str]]) -> None:
    assert len(rows) == N * len(LANGUAGES)
    assert all(set(r) == {"id", "lang", "instruction", "response", "family"} for r in rows)
    assert all(isinstance(v, str) and v.strip() for r in rows for v in r.values())
    # Ordered by id, then language in the requested order.
    assert [r["lang"] for r in rows[: len(LANGUAGES)]] == list(LANGUAGES)
    ids = [r["id"] for r in rows[:: len(LANGUAGES)]]
    assert ids == sorted(ids) and len(set(ids)) == N
    assert [int(i) for i in ids] == list(range(N))


def test_deterministic_by_seed() -> None:
    assert build_polyglot(20, seed=5) == build_polyglot(20, seed=5)
    assert build_polyglot(20, seed=5) != build_polyglot(20, seed=6)


def test_language_subset_and_prefix_are_consistent(rows: list[dict[str, str]]) -> None:
    subset = build_polyglot(N, ["sw", "en"], seed=1)
    index = {(r["id"], r["lang"]): r for r in rows}
    expected = [index[(f"{i:06d}", lang)] for i in range(N) for lang in ("sw", "en")]
    assert subset == expected
    assert build_polyglot(10, seed=1) == rows[: 10 * len(LANGUAGES)]


def test_all_languages_and_families_present(rows: list[dict[str, str]]) -> None:
    assert {r["lang"] for r in rows} == set(LANGUAGES)
    assert len({r["family"] for r in rows}) >= 5
    assert len({r["family"] for r in build_polyglot(10)}) >= 5


def _by_id(rows: list[dict[str, str]]) -> dict[str, list[dict[str, str]]]:
    grouped: dict[str, list[dict[str, str]]] = defaultdict(list)
    for r in rows:
        grouped[r["id"]].append(r)
    return grouped


def test_numbers_are_parallel_across_languages(rows: list[dict[str, str]]) -> None:
    for item_id, group in _by_id(rows).items():
        assert len({r["family"] for r in group}) == 1
        numbers = {
            r["lang"]: sorted(re.findall(r"\d+", r["instruction"] + " " + r["response"]))
            for r in group
        }
        assert len({tuple(v) for v in numbers.values()}) == 1, (item_id, numbers)


def test_answers_are_correct(rows: list[dict[str, str]]) -> None:
    for r in rows:
        if r["lang"] != "en":
            continue
        text = r["instruction"]
        if r["family"] == "arithmetic":
            a, op, b = re.match(r"What is (\d+) (plus|minus) (\d+)\?", text).groups()
            expected = int(a) + int(b) if op == "plus" else int(a) - int(b)
            assert r["response"].endswith(f"equals {expected}.")
        elif r["family"] == "word_problem":
            a, b = map(int, re.findall(r"\d+", text))
            got = int(re.search(r"\d+", r["response"]).group())
            assert got == (a + b if "buys" in text else a - b) and got >= 2
        elif r["family"] == "comparison":
            a, b = map(int, re.findall(r"\d+", text))
            first = int(re.match(r"\d+", r["response"]).group())
            assert first == (max(a, b) if "larger" in text else min(a, b))


def test_answer_language_matches_script(rows: list[dict[str, str]]) -> None:
    han = re.compile(r"[\u4e00-\u9fff]")
    cyrillic = re.compile(r"[\u0400-\u04ff]")
    for r in rows:
        for text in (r["instruction"], r["response"]):
            assert bool(han.search(text)) == (r["lang"] == "zh"), r
            assert bool(cyrillic.search(text)) == (r["lang"] == "ru"), r


def test_tables_cover_every_language() -> None:
    for person in PEOPLE:
        assert set(person.names) == set(LANGUAGES)
    for colour in COLOURS:
        assert set(colour) == set(LANGUAGES)
    assert len(OBJECTS) >= 5


def test_russian_plural_forms() -> None:
    forms = ("яблоко", "яблока", "яблок")
    assert [_ru_count(n, forms) for n in (1, 2, 5, 11, 12, 21, 22, 25, 111)] == [
        "яблоко", "яблока", "яблок", "яблок", "яблок", "яблоко", "яблока", "яблок", "яблок",
    ]  # fmt: skip


def test_enough_variety() -> None:
    english = [r["instruction"] for r in build_polyglot(3000, ["en"])]
    assert len(set(english)) > 2000


def test_unknown_language() -> None:
    with pytest.raises(ValueError, match=r"'xx'.*en, fr"):
        build_polyglot(3, ["en", "xx"])
    with pytest.raises(ValueError):
        build_polyglot(-1)


def test_parallel_pairs(rows: list[dict[str, str]]) -> None:
    pairs = parallel_pairs(rows)
    assert len(pairs) == N * (len(LANGUAGES) - 1)
    assert all(set(p) == {"id", "lang", "en", "target"} for p in pairs)
    assert "en" not in {p["lang"] for p in pairs}
    first = {r["lang"]: r for r in rows if r["id"] == pairs[0]["id"]}
    assert pairs[0]["en"] == first["en"]["instruction"]
    assert pairs[0]["target"] == first[pairs[0]["lang"]]["instruction"]

    by_fr = parallel_pairs(rows, dominant="fr", field="response")
    assert {p["lang"] for p in by_fr} == set(LANGUAGES) - {"fr"}
    assert by_fr[0]["en"] == first["fr"]["response"]

    assert parallel_pairs([r for r in rows if r["lang"] != "en"]) == []
    with pytest.raises(ValueError, match="duplicate"):
        parallel_pairs(rows[:2] + rows[:1])


def test_write_jsonl_and_cli(tmp_path, capsys) -> None:
    path = tmp_path / "nested" / "x.jsonl"
    assert write_jsonl([{"a": "héllo 你好"}], path) == 1
    assert "你好" in path.read_text(encoding="utf-8")

    assert main(["--items", "7", "--out", str(tmp_path / "out"), "--languages", "en,sw"]) == 0
    lines = (tmp_path / "out" / "polyglot.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 14 and json.loads(lines[1])["lang"] == "sw"
    pairs = (tmp_path / "out" / "pairs.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(pairs) == 7
    out = capsys.readouterr().out
    assert "en\t7" in out and "sw\t7" in out
