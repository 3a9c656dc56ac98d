"""The recipe reference (docs/recipe_reference.md), generated from `config.schema.Recipe`.

One source for every field's path, type, default and description: the schema. The committed
file is compared with this output by tests/config/test_reference.py, so it cannot go stale.

    python -m config.reference > docs/recipe_reference.md
"""

from __future__ import annotations

import argparse
import enum
import inspect
import json
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from annotated_types import Ge, Gt, Le, Lt, MaxLen, MinLen
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from config.schema import Recipe

DOC = Path(__file__).resolve().parents[1] / "docs" / "recipe_reference.md"
HEADER = """# Recipe reference

Generated from `config/schema.py` by `python -m config.reference` (do not edit by hand;
`tests/config/test_reference.py` fails when this file and the schema disagree). Every field
has a default unless it says *required*; an unknown key is an error. A list of sections
(`data.train`) is written `data.train[]`; `method` is one of the method sections, chosen by
`method.name`.
"""
_CONSTRAINTS = ((Ge, "ge", ">="), (Gt, "gt", ">"), (Le, "le", "<="), (Lt, "lt", "<"))


def _bound(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 2**16:
        for base in (2, 10):
            exp = round(__import__("math").log(value, base))
            if base**exp == value:
                return f"{base}^{exp}"
            if base**exp - 1 == value:
                return f"{base}^{exp}-1"
    return repr(value)


def _limits(metadata: list[Any]) -> list[str]:
    out = []
    for item in metadata:
        for cls, attr, sign in _CONSTRAINTS:
            if isinstance(item, cls):
                out.append(f"{sign} {_bound(getattr(item, attr))}")
        if isinstance(item, MinLen) and item.min_length:
            out.append(f"length >= {item.min_length}")
        if isinstance(item, MaxLen):
            out.append(f"length <= {item.max_length}")
        if getattr(item, "allow_inf_nan", None) is False:
            out.append("finite")
        # Field(...) inside Annotated[...] lands here as a FieldInfo with its own metadata.
        if isinstance(item, FieldInfo):
            out += _limits(item.metadata)
    return out


def type_name(annotation: Any) -> str:
    """A short, readable type: ``int (>= 1)``, ``"a" | "b"``, ``list[str] | None``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        base, *metadata = args
        limits = _limits(metadata)
        return type_name(base) + (f" ({', '.join(dict.fromkeys(limits))})" if limits else "")
    if origin is typing.Literal:
        return " | ".join(f'"{a}"' if isinstance(a, str) else repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin in (list, tuple, dict, set):
        inner = ", ".join("..." if a is Ellipsis else type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]" if args else origin.__name__
    if annotation is type(None):
        return "None"
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return "section"
    if inspect.isclass(annotation) and issubclass(annotation, enum.Enum):
        return " | ".join(repr(m.value) for m in annotation)
    if inspect.isclass(annotation):
        return {"Path": "path"}.get(annotation.__name__, annotation.__name__)
    return str(annotation).replace("typing.", "")


def default_text(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, BaseModel):
            return "(section)"
    elif field.default is PydanticUndefined:
        return "*required*"
    else:
        value = field.default
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, list | tuple | dict):
        # YAML flow style (JSON is valid YAML); sections as the keys that differ from defaults.
        plain = [v.model_dump(exclude_defaults=True) if isinstance(v, BaseModel) else v
                 for v in value] if not isinstance(value, dict) else value  # fmt: skip
        return f"`{json.dumps(plain, default=str)}`"
    return f"`{json.dumps(value, default=str)}`"


def _sections(annotation: Any) -> list[type[BaseModel]]:
    """The sections a field holds: itself, the items of a list, or each member of a union."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _sections(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType, list):
        return [s for a in typing.get_args(annotation) for s in _sections(a)]
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return [annotation]
    return []


def _variant(model: type[BaseModel]) -> str | None:
    name = model.model_fields.get("name")
    if name is not None and typing.get_origin(name.annotation) is typing.Literal:
        return typing.get_args(name.annotation)[0]
    return None


def _description(field: FieldInfo) -> str:
    text = " ".join((field.description or "").split())
    text = text.replace("<", "&lt;").replace(">", "&gt;")  # <lang> is not an HTML tag
    return text.replace("|", "\\|") or "—"


def _summary(model: type[BaseModel]) -> str:
    doc = inspect.getdoc(model) or ""
    if model.__doc__ is None or doc == inspect.getdoc(BaseModel) or not doc:
        return ""
    return " ".join(doc.split("\n\n")[0].split())


def rows(model: type[BaseModel], prefix: str) -> Iterator[tuple[str, str, str, str]]:
    """(path, type, default, description) for each field of ``model``, depth first."""
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        subs = _sections(field.annotation)
        listed = typing.get_origin(field.annotation) is list or any(
            typing.get_origin(a) is list for a in typing.get_args(field.annotation)
        )
        kind = type_name(field.annotation)
        limits = _limits(field.metadata)
        if limits:
            kind += f" ({', '.join(dict.fromkeys(limits))})"
        for sub in subs:
            kind = kind.replace(sub.__name__, "section")
        yield path, kind, default_text(field), _description(field)
        for sub in subs:  # a union (the method) lists each member's fields in turn
            yield from rows(sub, path + ("[]." if listed else "."))


TABLE_HEAD = ["| field | type | default | description |", "|---|---|---|---|"]


def _line(path: str, kind: str, default: str, text: str) -> str:
    kind = kind.replace("|", "\\|")  # a literal | inside a Markdown table cell
    return f"| `{path}` | {kind} | {default} | {text} |"


def _table(model: type[BaseModel], prefix: str) -> list[str]:
    return [*TABLE_HEAD, *(_line(*row) for row in rows(model, prefix)), ""]


def markdown() -> str:
    """The whole reference: one table per top-level section, one per method."""
    out = [HEADER]
    top = [(n, f) for n, f in Recipe.model_fields.items() if not _sections(f.annotation)]
    names = {name for name, _ in top}
    out += ["## Top level", "", *TABLE_HEAD]
    out += [_line(*row) for row in rows(Recipe, "") if row[0] in names]
    out += [""]
    for name, field in Recipe.model_fields.items():
        subs = _sections(field.annotation)
        if not subs:
            continue
        if len(subs) == 1:
            out += [f"## `{name}`", ""]
            summary = _description(field) if field.description else _summary(subs[0])
            if summary and summary != "—":
                out += [summary, ""]
            out += _table(subs[0], f"{name}.")
            continue
        out += [f"## `{name}`", ""]
        if field.description:
            out += [_description(field), ""]
        for sub in subs:
            variant = _variant(sub)
            title = f"`{name}.name: {variant}`" if variant else sub.__name__
            out += [f"### {title}", ""]
            if _summary(sub):
                out += [_summary(sub), ""]
            out += _table(sub, f"{name}.")
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m config.reference",
        description="Print the recipe reference (Markdown) generated from config/schema.py.",
    )
    parser.add_argument(
        "--write",
        action="store_true",
        help=f"write it to {DOC.relative_to(DOC.parents[1])} instead of printing it",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="exit 1 when the committed reference differs from the schema (for CI)",
    )
    args = parser.parse_args(argv)
    text = markdown()
    if args.check:
        current = DOC.read_text() if DOC.is_file() else ""
        if current != text:
            print(f"{DOC} is stale: run python -m config.reference --write", file=sys.stderr)
            return 1
        return 0
    if args.write:
        DOC.write_text(text)
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
