"""Reading a recipe: YAML + ``--set`` overrides -> a validated `Recipe`, or one clear error.

Every failure becomes a `RecipeError` whose message names the file line or the field path, so
the CLI can print it without a traceback before any work (or run directory) exists.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from config.errors import UserError
from config.schema import METHOD_NAMES, Recipe


class RecipeError(UserError):
    """A recipe that cannot run; the message is meant for the user as it is."""


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _field_path(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("function-after", "function-before")]
    if len(parts) > 1 and parts[0] == "method" and parts[1] in METHOD_NAMES:
        del parts[1]  # the discriminated union's tag is not part of the user's path
    return ".".join(parts)


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid recipe"]
    for item in err.errors():
        path = _field_path(item["loc"])
        msg = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            msg = "unknown key (not in the schema)"
        elif item["type"] == "missing":
            msg = "required field is missing"
        elif item["type"] == "union_tag_invalid" or item["type"] == "literal_error":
            msg = f"{msg}, got {_describe(item.get('input'))}"
        elif "input" in item and not isinstance(item["input"], dict):
            msg = f"{msg} (got {_describe(item['input'])})"
        lines.append(f"  {path}: {msg}" if path else f"  {msg}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` with the value read as YAML, so ``--set training.lr=1e-4`` is a float."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise RecipeError(f"--set {text!r}: expected KEY.PATH=VALUE, e.g. training.steps=10")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise RecipeError(f"--set {text!r}: value is not valid YAML ({exc})") from None
    return key.split("."), value


def apply_override(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node: Any = tree
    for depth, part in enumerate(path[:-1]):
        where = ".".join(path[: depth + 1])
        if isinstance(node, list):
            node = _list_item(node, part, where)
            continue
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict | list):
            raise RecipeError(f"--set {'.'.join(path)}: {where} is a value, not a section")
        node = child
    last = path[-1]
    if isinstance(node, list):
        node[_list_index(node, last, ".".join(path))] = value
    else:
        node[last] = value


def _list_index(node: list, part: str, where: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise RecipeError(
            f"--set {where}: index {part!r} is not an item of a {len(node)}-item list"
        )
    return int(part)


def _list_item(node: list, part: str, where: str) -> Any:
    return node[_list_index(node, part, where)]


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe YAML where a key given twice in one mapping is an error (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: construct_mapping reports it
                continue
            seen[key] = line
            if first is not None:
                raise RecipeError(
                    f"{self.name}:{line}: duplicate key {key!r} (first given on line {first})"
                )
        return super().construct_mapping(node, deep=deep)


def read_text_file(path: Path, what: str = "file") -> str:
    """UTF-8 text, or a RecipeError naming the file, the encoding problem and its line."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    for bom, name in (
        (b"\xff\xfe", "UTF-16"),
        (b"\xfe\xff", "UTF-16"),
        (b"\x00\x00\xfe\xff", "UTF-32"),
    ):
        if data.startswith(bom):
            raise RecipeError(f"{path}: the {what} is {name} text; save it as UTF-8")
    if b"\x00" in data:
        line = data[: data.index(b"\x00")].count(b"\n") + 1
        raise RecipeError(
            f"{path}:{line}: the {what} holds NUL bytes; it looks like UTF-16, save it as UTF-8"
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise RecipeError(
            f"{path}:{line}: the {what} is not UTF-8 text (byte 0x{data[exc.start]:02x})"
        ) from None


def load_yaml_file(path: str | os.PathLike, what: str = "recipe") -> Any:
    """A YAML file read strictly: UTF-8, no duplicate keys, errors as `file:line: problem`."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: {what} file not found")
    text = read_text_file(path, what)
    try:
        loader = _UniqueKeyLoader(text)
    except yaml.YAMLError as exc:  # the reader refuses control characters
        raise RecipeError(f"{path}: invalid YAML: {exc}") from None
    loader.name = str(path)
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise RecipeError(f"{where}: invalid YAML: {exc.problem or exc}") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: invalid YAML: {exc}") from None
    finally:
        loader.dispose()


def load_recipe_dict(path: str | os.PathLike) -> dict[str, Any]:
    tree = load_yaml_file(path, "recipe")
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections, got {type(tree).__name__}")
    return tree


def load_recipe(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Recipe:
    tree = load_recipe_dict(path)
    tree.setdefault("name", Path(path).stem)
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(tree, keys, value)
    return validate_recipe(tree, source=str(path))


def validate_recipe(tree: dict[str, Any], source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(tree)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(exc, source)) from None


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
