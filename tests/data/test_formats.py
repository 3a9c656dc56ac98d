"""Bring-your-own-data formats: alpaca, ShareGPT, messages, from a recipe to labelled examples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from config.recipe import RecipeError, load_recipe
from config.schema import DataSection, DataSource
from data.formatting import IGNORE_INDEX, Example, encode_dialogue, encode_example
from data.pipeline import build_run_data
from data.sources import DataError, load_rows
from tests.helpers.tiny import byte_tokenizer

END = "<|im_end|>\n"  # what tests.helpers.tiny.CHATML puts after every turn

CHAT_EN = [
    {"from": "system", "value": "Answer briefly."},
    {"from": "human", "value": "Name a colour."},
    {"from": "gpt", "value": "Blue."},
    {"from": "human", "value": "Another one?"},
    {"from": "gpt", "value": "Green."},
]
CHAT_SW = [
    {"from": "human", "value": "Taja rangi."},
    {"from": "gpt", "value": "Bluu."},
    {"from": "human", "value": "Nyingine?"},
    {"from": "gpt", "value": "Kijani."},
]
ROLE = {"human": "user", "gpt": "assistant", "system": "system"}


def as_messages(turns: list[dict]) -> list[dict]:
    return [{"role": ROLE[t["from"]], "content": t["value"]} for t in turns]


def jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), "utf-8")
    return path


def labelled_spans(tok, example: Example) -> list[str]:
    """Text of each maximal run of positions that carry a label."""
    spans, run = [], []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            run.append(token)
        elif run:
            spans.append(run)
            run = []
    if run:
        spans.append(run)
    return [tok.decode(span) for span in spans]


def chatml(messages: list[dict]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}{END}" for m in messages)


def run_data(tmp_path: Path, sources: list[dict], **data) -> tuple:
    """RunData of a recipe whose data section is ``data`` with ``sources`` as data.train."""
    recipe_path = tmp_path / "recipe.yaml"
    data.setdefault("eval", sources)  # no id-based hold-out: every row is in both splits
    recipe_path.write_text(json.dumps({"name": "byod", "data": {"train": sources, **data}}))
    section = load_recipe(recipe_path).data
    tok = byte_tokenizer()
    return tok, build_run_data(section, tok)


def test_alpaca_json_array_joins_input_and_learns_the_output(tmp_path: Path) -> None:
    rows = [
        {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
        {"instruction": "Say hello.", "input": "", "output": "Hello!"},
        {"instruction": "Add 2 and 3.", "output": "5"},
    ]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(rows, indent=2), "utf-8")  # pretty-printed, many lines
    source = {"path": str(path), "language": "en"}
    tok, data = run_data(tmp_path, [source], eval=[source])
    by_id = {e.id: e for e in data.train}
    assert sorted(by_id) == ["0", "1", "2"]
    first = tok.decode(by_id["0"].input_ids)
    assert first == chatml(
        [
            {"role": "user", "content": "Translate to French.\n\nGood morning"},
            {"role": "assistant", "content": "Bonjour"},
        ]
    )
    assert labelled_spans(tok, by_id["0"]) == ["Bonjour" + END]
    assert "<|im_start|>user\nSay hello.<|im_end|>" in tok.decode(by_id["1"].input_ids)
    assert labelled_spans(tok, by_id["2"]) == ["5" + END]
    assert data.train_rows[0]["instruction"] == "Translate to French.\n\nGood morning"


def test_alpaca_jsonl_input_is_joined_and_explicit_format(tmp_path: Path) -> None:
    record = {
        "instruction": "Summarise:",
        "input": "A long text.",
        "output": "Short.",
        "lang": "en",
    }
    path = jsonl(tmp_path / "alpaca.jsonl", [record])
    for fmt in ("auto", "alpaca"):
        rows, _ = load_rows(path, format=fmt)
        assert rows == [
            {"lang": "en", "instruction": "Summarise:\n\nA long text.", "response": "Short.",
             "id": "0"}
        ]  # fmt: skip


def test_json_array_rows_are_located_by_line(tmp_path: Path) -> None:
    path = tmp_path / "alpaca.json"
    path.write_text(
        '[\n  {"instruction": "a", "output": "b", "lang": "en"},\n'
        '  {"instruction": "a", "output": 7, "lang": "en"}\n]\n',
        "utf-8",
    )
    with pytest.raises(DataError) as info:
        load_rows(path)
    assert str(info.value).startswith(f'{path}:3: field "output" is not a string (got number)')
    rows, report = load_rows(path, on_bad_row="skip")
    assert len(rows) == 1 and report.reasons == {'field "output" is not a string': 1}

    path.write_text('[\n  {"instruction": "a", "output": "b", "lang": "en"},\n  {"inst\n]', "utf-8")
    with pytest.raises(DataError, match=rf"^{path}:3: invalid JSON"):
        load_rows(path, on_bad_row="skip")  # no way to resynchronise inside one array
    path.write_text('[{"instruction": "a", "output": "b", "lang": "en"}]\n{"x": 1}\n', "utf-8")
    with pytest.raises(DataError, match=rf"^{path}:2: text after the JSON array"):
        load_rows(path)
    path.write_text("[]", "utf-8")
    assert load_rows(path)[0] == []


def test_sharegpt_multi_turn_labels_exactly_the_assistant_turns(tmp_path: Path) -> None:
    path = jsonl(
        tmp_path / "chat.jsonl",
        [
            {"conversations": CHAT_EN, "id": "c1"},
            {"conversations": CHAT_SW, "id": "c1", "lang": "sw"},
        ],
    )
    source = {"path": str(path), "language": "en", "format": "sharegpt"}
    tok, data = run_data(tmp_path, [source], eval=[source])
    assert data.languages == ["en", "sw"]
    en, sw = sorted(data.train, key=lambda e: e.lang)
    assert tok.decode(en.input_ids) == chatml(as_messages(CHAT_EN))
    assert labelled_spans(tok, en) == ["Blue." + END, "Green." + END]
    assert labelled_spans(tok, sw) == ["Bluu." + END, "Kijani." + END]
    # Every other token (system, both user turns, each assistant header) carries no label.
    unlabelled = sum(label == IGNORE_INDEX for label in en.labels)
    assert unlabelled == len(en.input_ids) - len(tok("Blue." + END + "Green." + END).input_ids)
    assert [e.lang for e in data.eval] == ["en", "sw"]
    # The first exchange stays available as plain text (pairs, CrossIn, detection).
    assert data.train_rows[0]["instruction"] == "Name a colour."
    assert data.train_rows[0]["response"] == "Blue."


def test_messages_multi_turn_same_as_sharegpt_and_per_row_language(tmp_path: Path) -> None:
    messages = jsonl(
        tmp_path / "messages.jsonl",
        [{"messages": as_messages(CHAT_EN)}, {"messages": as_messages(CHAT_SW), "lang": "sw"}],
    )
    sharegpt = jsonl(
        tmp_path / "sharegpt.jsonl",
        [{"conversations": CHAT_EN}, {"conversations": CHAT_SW, "lang": "sw"}],
    )
    _, from_messages = run_data(tmp_path, [{"path": str(messages), "language": "en"}])
    _, from_sharegpt = run_data(tmp_path, [{"path": str(sharegpt), "language": "en"}])
    assert from_messages.train + from_messages.eval == from_sharegpt.train + from_sharegpt.eval
    assert from_messages.train_rows == from_sharegpt.train_rows
    rows, _ = load_rows(messages, language="en")
    assert [r["lang"] for r in rows] == ["en", "sw"]
    assert rows[1]["messages"] == as_messages(CHAT_SW)


def test_single_exchange_conversation_is_a_plain_row(tmp_path: Path) -> None:
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    rows, _ = load_rows(jsonl(tmp_path / "m.jsonl", [{"messages": turns, "lang": "en"}]))
    assert rows == [{"lang": "en", "instruction": "Hi", "response": "Hello", "id": "0"}]


def test_system_prompt_only_where_the_conversation_has_none() -> None:
    tok = byte_tokenizer()
    turns = as_messages(CHAT_SW)
    ex = encode_dialogue(tok, turns, lang="sw", id="1", max_length=512, system_prompt="Be kind.")
    assert tok.decode(ex.input_ids).startswith("<|im_start|>system\nBe kind.<|im_end|>")
    own = as_messages(CHAT_EN)
    ex = encode_dialogue(tok, own, lang="en", id="1", max_length=512, system_prompt="Be kind.")
    assert "Be kind." not in tok.decode(ex.input_ids)


def test_truncated_and_template_free_dialogues() -> None:
    tok = byte_tokenizer()
    turns = as_messages(CHAT_EN)
    whole = encode_dialogue(tok, turns, lang="en", id="1", max_length=512)
    cut = len(whole.input_ids) - len(tok("Green." + END).input_ids) + 2  # keeps "Gr"
    short = encode_dialogue(tok, turns, lang="en", id="1", max_length=cut)
    assert labelled_spans(tok, short) == ["Blue." + END, "Gr"]
    first_label = next(i for i, label in enumerate(whole.labels) if label != IGNORE_INDEX)
    assert encode_dialogue(tok, turns, lang="en", id="1", max_length=first_label) is None
    assert encode_dialogue(tok, turns, lang="en", id="1", max_length=first_label + 1)

    tok.chat_template = None  # plain text: turns separated by blank lines, EOS after answers
    plain = encode_dialogue(tok, turns, lang="en", id="1", max_length=512)
    assert tok.decode(plain.input_ids) == (
        "Answer briefly.\n\nName a colour.\n\nBlue.<|im_end|>Another one?\n\nGreen.<|im_end|>"
    )
    assert labelled_spans(tok, plain) == ["Blue.<|im_end|>", "Green.<|im_end|>"]
    single = encode_example(tok, "Name a colour.", "Blue.", lang="en", id="1", max_length=512)
    pair = encode_dialogue(tok, turns[1:3], lang="en", id="1", max_length=512)
    assert single == pair


def turns_of(*pairs: tuple[str, str]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in pairs]


BAD_ROWS = [
    ({"conversations": "hi"}, 'field "conversations" is not an array (got string)'),
    ({"conversations": [{"from": "human", "value": "q"}, "a"]},
     'field "conversations[1]" is not a JSON object (got string)'),
    ({"conversations": [{"from": "bot", "value": "q"}]},
     "field \"conversations[0].from\" is not a known role (got 'bot'"),
    ({"conversations": [{"from": "human", "text": "q"}, {"from": "gpt", "value": "a"}]},
     'missing field "conversations[0].value"'),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]},
     'field "conversations[1].value" is empty'),
    ({"conversations": [{"from": "gpt", "value": "a"}]},
     'field "conversations[0].from" is out of turn'),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q"}]},
     'field "conversations[1].from" is out of turn'),
    ({"conversations": [{"from": "human", "value": "q"}]},
     'field "conversations" does not end with an assistant turn'),
    ({"conversations": []}, 'field "conversations" does not end with an assistant turn'),
    ({"messages": turns_of(("user", "q"), ("assistant", "a"))}, 'missing field "conversations"'),
]  # fmt: skip


@pytest.mark.parametrize(("record", "message"), BAD_ROWS)
def test_bad_conversation_names_file_line_and_field(
    tmp_path: Path, record: dict, message: str
) -> None:
    good = {"conversations": CHAT_EN, "lang": "en"}
    path = jsonl(tmp_path / "chat.jsonl", [good, {**record, "lang": "en"}, good])
    with pytest.raises(DataError) as info:
        load_rows(path)  # auto: sharegpt from the first row
    assert str(info.value).startswith(f"{path}:2: {message}")
    rows, report = load_rows(path, on_bad_row="skip")
    assert len(rows) == 2 and report.skipped == 1


@pytest.mark.parametrize(
    ("fmt", "record", "message"),
    [
        ("messages", {"messages": turns_of(("user", "q"), ("gpt", "a"))},
         "field \"messages[1].role\" is not a known role (got 'gpt'"),
        ("messages", {"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]},
         'missing field "messages[0].content"'),
        ("messages", {"messages": turns_of(("user", "q"), ("assistant", "a"), ("system", "s"))},
         'field "messages[2].role" is out of turn'),
        ("messages", {"conversations": CHAT_EN}, 'missing field "messages"'),
        ("alpaca", {"instruction": "q", "input": 3, "output": "a"},
         'field "input" is not a string (got number)'),
        ("alpaca", {"instruction": "q", "response": "a"}, 'missing field "output"'),
        ("instruction", {"instruction": "q", "output": "a"}, 'missing field "response"'),
    ],
)  # fmt: skip
def test_explicit_format_errors_name_the_field(
    tmp_path: Path, fmt: str, record: dict, message: str
) -> None:
    path = jsonl(tmp_path / "rows.jsonl", [{**record, "lang": "en"}])
    with pytest.raises(DataError) as info:
        load_rows(path, format=fmt)
    assert str(info.value).startswith(f"{path}:1: {message}")


def test_auto_detection_and_field_mapping(tmp_path: Path) -> None:
    # role/content turns under a "conversations" column are read as messages.
    path = jsonl(tmp_path / "a.jsonl", [{"conversations": as_messages(CHAT_SW), "lang": "sw"}])
    assert load_rows(path)[0][0]["messages"] == as_messages(CHAT_SW)
    # fields renames the conversation column and the language column.
    path = jsonl(tmp_path / "b.jsonl", [{"dialog": CHAT_SW, "language": "sw"}])
    rows, _ = load_rows(path, format="sharegpt", fields={"messages": "dialog", "lang": "language"})
    assert rows[0]["lang"] == "sw" and rows[0]["instruction"] == "Taja rangi."
    # A first row of no known shape is read as instruction rows, whose error names the field.
    path = jsonl(tmp_path / "c.jsonl", [{"prompt": "q", "completion": "a", "lang": "en"}])
    with pytest.raises(DataError) as info:
        load_rows(path)
    assert str(info.value) == (
        f'{path}:1: missing field "instruction" (no known format in the first row; '
        "set the source's format (instruction, alpaca, sharegpt, messages))"
    )
    # Lines that are not objects do not decide the format; the first object does.
    jsonl(path, [[1], {"conversations": CHAT_SW, "lang": "sw"}])
    rows, report = load_rows(path, on_bad_row="skip")
    assert report.skipped == 1 and rows[0]["messages"] == as_messages(CHAT_SW)
    with pytest.raises(DataError, match="unknown format 'csv'"):
        load_rows(path, format="csv")


def test_recipe_rejects_an_unknown_format(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps({"name": "x", "data": {"train": [{"path": "a", "format": "gpt"}]}}))
    with pytest.raises(RecipeError, match=r"data\.train\.0\.format"):
        load_recipe(path)
    path.write_text(
        json.dumps({"name": "x", "data": {"train": [{"path": "a", "fields": {"x": "y"}}]}})
    )
    with pytest.raises(RecipeError, match="unknown canonical field"):
        load_recipe(path)
    assert DataSource(path="a").format == "auto"
    assert DataSection().train[0].format == "auto"


def _byod_files(tmp_path: Path) -> list[dict]:
    """Eight rows per format: alpaca (JSON array, en), ShareGPT (fr), messages (sw)."""
    alpaca = [
        {"instruction": f"Add {a} and {a + 1}.", "input": "" if a % 2 else "Reply with digits.",
         "output": str(2 * a + 1)}
        for a in range(8)
    ]  # fmt: skip
    (tmp_path / "alpaca.json").write_text(json.dumps(alpaca, indent=1), "utf-8")
    sharegpt = [
        {"conversations": [{"from": "human", "value": f"Combien font {a} plus {a}?"},
                           {"from": "gpt", "value": str(2 * a)},
                           {"from": "human", "value": "Et en lettres?"},
                           {"from": "gpt", "value": f"Le double de {a}."}]}
        for a in range(8)
    ]  # fmt: skip
    messages = [
        {"messages": as_messages([{"from": t["from"], "value": t["value"] + " sw"}
                                  for t in row["conversations"]]), "lang": "sw"}
        for row in sharegpt
    ]  # fmt: skip
    return [
        {"path": str(tmp_path / "alpaca.json"), "language": "en"},
        {"path": str(jsonl(tmp_path / "sharegpt.jsonl", sharegpt)), "language": "fr"},
        {"path": str(jsonl(tmp_path / "messages.jsonl", messages)), "format": "messages"},
    ]


@pytest.mark.slow  # runs the launcher in a fresh process
def test_training_run_on_all_three_formats_learns(tmp_path: Path, tiny_model_dir: Path) -> None:
    from tests.helpers.runs import run_cli, summary, tiny_recipe, write_recipe

    sources = _byod_files(tmp_path)
    recipe = tiny_recipe(
        tiny_model_dir,
        tmp_path,
        data={"train": sources, "eval": sources, "languages": ["en", "fr", "sw"]},
        training={"steps": 8},
    )
    recipe["name"] = "byod"
    proc = run_cli(str(write_recipe(tmp_path / "byod.yaml", recipe)), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"train": {"en": 8, "fr": 8, "sw": 8}' in proc.stdout
    s = summary(tmp_path / "runs" / "byod")
    assert sorted(s["eval_after"]) == ["en", "fr", "sw"]
    for lang, before in s["eval_before"].items():
        assert s["eval_after"][lang] < before, lang
