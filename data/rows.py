"""One source record -> a canonical row, for each bring-your-own-data format.

A row is ``{"lang", "instruction", "response", "id"}`` of non-empty strings.  A conversation
that is more than one user turn and one reply (or that carries its own system message) also
keeps ``"messages"``: ``[{"role": "system"|"user"|"assistant", "content"}]``, which the
encoder turns into one example with the loss on every assistant turn.  ``instruction`` and
``response`` are then its first exchange, so pair building and CrossIn still see plain text.

Formats (``format:`` of a data source):

* ``instruction``: ``instruction``, ``response`` (the project's own rows; an ``input`` is
  joined as in alpaca, never dropped);
* ``alpaca``: ``instruction``, optional ``input`` (joined to the instruction after a blank
  line, as the Alpaca prompt does), ``output``;
* ``sharegpt``: ``conversations`` of ``{"from": human|gpt|system, "value"}``;
* ``messages``: ``messages`` of ``{"role": user|assistant|system, "content"}`` (OpenAI style);
* ``auto``: chosen once per source from its first JSON object.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

FORMATS: tuple[str, ...] = ("auto", "instruction", "alpaca", "sharegpt", "messages")
FIELD_NAMES: tuple[str, ...] = ("lang", "instruction", "input", "response", "messages", "id")

# Column names per format before the source's ``fields`` mapping is applied.
_DEFAULT_COLUMNS: dict[str, dict[str, str]] = {
    "instruction": {"instruction": "instruction", "input": "input", "response": "response"},
    "alpaca": {"instruction": "instruction", "input": "input", "response": "output"},
    "sharegpt": {"messages": "conversations"},
    "messages": {"messages": "messages"},
}
# Turn keys and role names of the two conversation formats (aliases -> canonical role).
_TURN_KEYS = {"sharegpt": ("from", "value"), "messages": ("role", "content")}
_ROLES = {
    "sharegpt": {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                 "system": "system"},
    "messages": {"user": "user", "assistant": "assistant", "system": "system"},
}  # fmt: skip


class BadRow(Exception):
    """A rejected record; ``reason`` is the stable key counted in the load report."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason} ({self.detail})" if self.detail else self.reason


def columns(fmt: str, fields: Mapping[str, str]) -> dict[str, str]:
    """Canonical name -> column name of ``fmt``, with the source's ``fields`` on top."""
    names = {"lang": "lang", "id": "id", **_DEFAULT_COLUMNS[fmt]}
    names.update({canon: col for canon, col in fields.items() if canon in names})
    return names


def detect_format(record: Any, fields: Mapping[str, str]) -> tuple[str | None, dict[str, str]]:
    """The format whose columns the record has (None: none fits), and ``fields`` completed
    for it.  Role/content turns under a ``conversations`` column (common on the Hub) are
    ``messages`` read from that column."""
    if isinstance(record, Mapping):  # (only objects reach here; the guard is for other callers)
        for fmt, other in (("sharegpt", "messages"), ("messages", "sharegpt")):
            column = columns(fmt, fields)["messages"]
            turns = record.get(column)
            if isinstance(turns, list):
                first = next((t for t in turns if isinstance(t, Mapping)), {})
                if _TURN_KEYS[other][0] in first and _TURN_KEYS[fmt][0] not in first:
                    return other, {**fields, "messages": column}
                return fmt, dict(fields)
        for fmt in ("instruction", "alpaca"):
            names = columns(fmt, fields)
            if names["instruction"] in record and names["response"] in record:
                return fmt, dict(fields)
    return None, dict(fields)


def normalise(
    record: Any, index: int, fmt: str, names: Mapping[str, str], language: str | None
) -> dict[str, Any]:
    """Canonical row of ``record`` (``index``: its position, the default id) or `BadRow`."""
    if not isinstance(record, Mapping):
        raise BadRow("line is not a JSON object", f"got {json_type(record)}")
    if fmt in ("sharegpt", "messages"):
        row: dict[str, Any] = _conversation(record, fmt, names["messages"])
    else:
        instruction = text(record, names["instruction"])
        extra = record.get(names["input"])
        if extra is not None and not isinstance(extra, str):
            raise BadRow(f'field "{names["input"]}" is not a string', f"got {json_type(extra)}")
        if extra and extra.strip():  # alpaca rows mostly carry input ""
            instruction = f"{instruction}\n\n{extra}"
        row = {"instruction": instruction, "response": text(record, names["response"])}
    lang_col = names["lang"]
    if record.get(lang_col) is not None:
        lang = text(record, lang_col)
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
        row_id = text(record, id_col)
    return {"lang": lang, "instruction": row["instruction"], "response": row["response"],
            "id": row_id, **({"messages": row["messages"]} if "messages" in row else {})}  # fmt: skip


def _conversation(record: Mapping[str, Any], fmt: str, column: str) -> dict[str, Any]:
    """Validated turns: optional system first, then user/assistant alternating, ending on an
    assistant turn (a trailing prompt would teach nothing)."""
    if column not in record:
        raise BadRow(f'missing field "{column}"')
    turns = record[column]
    if not isinstance(turns, list):
        raise BadRow(f'field "{column}" is not an array', f"got {json_type(turns)}")
    role_key, content_key = _TURN_KEYS[fmt]
    roles = _ROLES[fmt]
    messages = []
    for i, turn in enumerate(turns):
        where = f"{column}[{i}]"
        if not isinstance(turn, Mapping):
            raise BadRow(f'field "{where}" is not a JSON object', f"got {json_type(turn)}")
        role = turn.get(role_key)
        if role not in roles:
            raise BadRow(
                f'field "{where}.{role_key}" is not a known role',
                f"got {role!r}; expected one of {', '.join(roles)}",
            )
        role = roles[role]
        if i == 0:
            expected: tuple[str, ...] = ("system", "user")
        else:
            expected = ("assistant",) if messages[-1]["role"] == "user" else ("user",)
        if role not in expected:
            raise BadRow(
                f'field "{where}.{role_key}" is out of turn',
                f"got {turn[role_key]!r}; turns are an optional system message, then user and "
                "assistant alternating",
            )
        messages.append({"role": role, "content": text(turn, content_key, where)})
    if not messages or messages[-1]["role"] != "assistant":
        raise BadRow(f'field "{column}" does not end with an assistant turn')
    plain = [m for m in messages if m["role"] != "system"]
    row: dict[str, Any] = {"instruction": plain[0]["content"], "response": plain[1]["content"]}
    if len(messages) > 2:  # more than one exchange, or a system message of its own
        row["messages"] = messages
    return row


def text(record: Mapping[str, Any], column: str, parent: str = "") -> str:
    name = f"{parent}.{column}" if parent else column
    if column not in record:
        raise BadRow(f'missing field "{name}"')
    value = record[column]
    if not isinstance(value, str):
        raise BadRow(f'field "{name}" is not a string', f"got {json_type(value)}")
    if not value.strip():
        raise BadRow(f'field "{name}" is empty')
    return value


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__
