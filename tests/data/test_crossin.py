"""CrossIn mixtures: proportions, determinism, tags, translation pairs, response-only loss."""

from __future__ import annotations

import json

import datasets
import pytest

from data.crossin import (
    COLUMNS,
    CrossInConfig,
    CrossInError,
    build_crossin,
    build_crossin_dataset,
    main,
    mode_counts,
    parse_proportions,
)
from data.formatting import IGNORE_INDEX, encode_example
from data.polyglot import build_polyglot
from data.sources import load_rows
from tests.helpers.tiny import byte_tokenizer

LANGS = ["en", "fr", "sw", "zh"]
NAMES = {"en": "English", "fr": "French", "sw": "Swahili", "zh": "Chinese"}
PROPS = {"en2x": 0.3, "x2en": 0.2, "x2x": 0.3, "translate": 0.2}


@pytest.fixture(scope="module")
def source_rows() -> list[dict]:
    return build_polyglot(30, LANGS, seed=1)


@pytest.fixture(scope="module")
def items(source_rows) -> dict[str, dict[str, dict]]:
    grouped: dict[str, dict[str, dict]] = {}
    for row in source_rows:
        grouped.setdefault(row["id"], {})[row["lang"]] = row
    return grouped


def _build(rows, **kwargs) -> list[dict]:
    return build_crossin(rows, CrossInConfig(**{"size": 200, "proportions": PROPS, **kwargs}))


@pytest.mark.parametrize("size", [0, 1, 7, 200, 333])
def test_counts_follow_proportions(source_rows, size):
    mixed = _build(source_rows, size=size)
    assert len(mixed) == size
    for mode, fraction in PROPS.items():
        got = sum(r["mode"] == mode for r in mixed)
        assert abs(got - size * fraction) < 1, (mode, got)
    assert mode_counts(size, PROPS) == {m: sum(r["mode"] == m for r in mixed) for m in PROPS}


def test_deterministic_by_seed(source_rows):
    assert _build(source_rows, seed=3) == _build(source_rows, seed=3)
    assert _build(source_rows, seed=3) != _build(source_rows, seed=4)


def test_rows_are_correct_and_tagged(source_rows, items):
    mixed = _build(source_rows, size=200)  # within every mode's candidate space: no repeats
    assert len({json.dumps(r, sort_keys=True) for r in mixed}) == len(mixed)
    for row in mixed:
        assert set(row) == set(COLUMNS)
        src, tgt, mode = row["src_lang"], row["tgt_lang"], row["mode"]
        assert row["lang"] == tgt
        prompt, tag = row["instruction"].rsplit("\n", 1)
        assert tag == f"[Answer in {NAMES[tgt]}]"
        item = items[row["id"]]
        if mode == "translate":
            assert "en" in (src, tgt) and src != tgt
            head, text = prompt.split("\n", 1)
            assert head == f"Translate the following text into {NAMES[tgt]}:"
            field = "instruction" if text == item[src]["instruction"] else "response"
            assert text == item[src][field]
            assert row["response"] == item[tgt][field]
            continue
        assert prompt == item[src]["instruction"]
        assert row["response"] == item[tgt]["response"]
        if mode == "en2x":
            assert src == "en" and tgt != "en"
        elif mode == "x2en":
            assert src != "en" and tgt == "en"
        else:
            assert "en" not in (src, tgt)
    x2x_pairs = {(r["src_lang"], r["tgt_lang"]) for r in mixed if r["mode"] == "x2x"}
    assert any(s == t for s, t in x2x_pairs) and any(s != t for s, t in x2x_pairs)


def test_more_rows_than_candidates_cycles_evenly(source_rows):
    mixed = _build(source_rows, size=100, proportions={"en2x": 1.0})  # 30 items x 3 languages
    seen: dict[str, int] = {}
    for row in mixed:
        key = json.dumps(row, sort_keys=True)
        seen[key] = seen.get(key, 0) + 1
    assert len(seen) == 90 and set(seen.values()) == {1, 2}


def test_response_only_loss_after_encoding(source_rows):
    tokenizer = byte_tokenizer()
    dataset = build_crossin_dataset(source_rows, CrossInConfig(size=12, proportions=PROPS))
    assert isinstance(dataset, datasets.Dataset)
    assert dataset.column_names == list(COLUMNS)
    for row in dataset:
        ex = encode_example(tokenizer, row["instruction"], row["response"], lang=row["lang"],
                            id=row["id"], max_length=1024)  # fmt: skip
        assert ex is not None
        n_prompt = sum(label == IGNORE_INDEX for label in ex.labels)
        assert all(label == IGNORE_INDEX for label in ex.labels[:n_prompt])
        prompt_text = tokenizer.decode(ex.input_ids[:n_prompt])
        assert row["instruction"] in prompt_text  # the tag is in the masked prompt
        learned = tokenizer.decode([t for t in ex.labels if t != IGNORE_INDEX])
        assert learned.startswith(row["response"])


@pytest.mark.parametrize(
    ("proportions", "message"),
    [
        ({"en2x": 0.5, "x2en": 0.2}, "must sum to 1, got 0.7"),
        ({"en2x": 0.5, "x2y": 0.5}, "unknown mode(s) ['x2y']"),
        ({"en2x": 1.5, "x2en": -0.5}, "x2en must be a fraction >= 0"),
    ],
)
def test_bad_proportions(proportions, message):
    with pytest.raises(CrossInError, match="proportions") as err:
        CrossInConfig(size=10, proportions=proportions)
    assert message in str(err.value)


def test_parse_proportions_and_other_errors(source_rows):
    assert parse_proportions("en2x=0.5, translate=0.5") == {"en2x": 0.5, "translate": 0.5}
    with pytest.raises(CrossInError, match="is not a number"):
        parse_proportions("en2x=half")
    with pytest.raises(CrossInError, match="mode=fraction"):
        parse_proportions("en2x")
    with pytest.raises(CrossInError, match="no name for language code 'xx'"):
        build_crossin([{"id": "1", "lang": "xx", "instruction": "a", "response": "b"},
                       {"id": "1", "lang": "en", "instruction": "a", "response": "b"}],
                      CrossInConfig(size=2, proportions={"en2x": 1.0}))  # fmt: skip
    only_en = [r for r in source_rows if r["lang"] == "en"]
    with pytest.raises(CrossInError, match="besides the pivot"):
        build_crossin(only_en, CrossInConfig(size=2, proportions={"en2x": 1.0}))


def test_cli_writes_a_loadable_dataset(tmp_path, capsys):
    out = tmp_path / "cx"
    code = main(["--source", "builtin:polyglot?items=20&languages=en,fr,sw", "--out", str(out),
                 "--size", "50", "--proportions", "en2x=0.4,x2x=0.4,translate=0.2",
                 "--seed", "0"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "en2x" in printed and "en->sw" in printed and "x2en            0" in printed
    rows, report = load_rows(out)  # what data.train: [{path: OUT}] reads
    assert report.kept == 50 and {r["lang"] for r in rows} <= {"en", "fr", "sw"}
    saved = datasets.load_from_disk(str(out / "dataset"))
    assert saved.num_rows == 50 and saved.column_names == list(COLUMNS)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["modes"] == {"en2x": 20, "x2en": 0, "x2x": 20, "translate": 10}
    assert main(["--source", "builtin:polyglot?items=5", "--out", str(out), "--size", "5",
                 "--proportions", "en2x=0.9"]) == 2  # fmt: skip
    assert "must sum to 1" in capsys.readouterr().err
