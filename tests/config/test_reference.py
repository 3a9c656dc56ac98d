"""The committed recipe reference is exactly what the schema generates, and covers every field."""

from __future__ import annotations

import typing

from config.reference import DOC, default_text, main, markdown, rows, type_name
from config.schema import Recipe, ShifConMethod, TrainingSection


def test_committed_reference_matches_the_schema() -> None:
    assert DOC.read_text() == markdown(), (
        "docs/recipe_reference.md is stale: run python -m config.reference --write"
    )


def test_every_field_is_listed_with_a_description() -> None:
    paths = {path: text for path, _, _, text in rows(Recipe, "")}
    assert len(paths) > 100
    text = markdown()
    # One entry per field of every section, lists and method variants included.
    for path in ("data.train[].format", "method.band", "training.lr", "eval.files", "lora.rank"):
        assert path in paths and f"| `{path}` |" in text, path
    missing = sorted(path for path, _, _, text in rows(Recipe, "") if text == "—")
    assert missing == [], f"schema fields without a description: {missing}"


def test_types_and_defaults_read_as_in_yaml() -> None:
    fields = TrainingSection.model_fields
    assert default_text(fields["lr"]) == "`2e-05`"
    assert default_text(fields["schedule"]) == '`"cosine"`'
    assert default_text(fields["betas"]) == "`[0.9, 0.95]`"
    assert default_text(ShifConMethod.model_fields["band"]) == "*required*"
    assert type_name(typing.Literal["a", 3]) == '"a" | 3'
    assert type_name(list[str] | None) == "list[str] | None"
    assert type_name(ShifConMethod.model_fields["band"].annotation).endswith('| "auto"')
    by_path = {path: kind for path, kind, _, _ in rows(Recipe, "")}
    assert by_path["data.eval_fraction"].startswith("float (> 0.0, < 1.0")
    assert by_path["lora.target_modules"].startswith('list[str] | "all-linear"')


def test_check_mode_reports_staleness(tmp_path, monkeypatch, capsys) -> None:
    import config.reference as reference

    assert main(["--check"]) == 0
    stale = tmp_path / "ref.md"
    stale.write_text("old\n")
    monkeypatch.setattr(reference, "DOC", stale)
    assert main(["--check"]) == 1 and "stale" in capsys.readouterr().err
    assert main(["--write"]) == 0 and stale.read_text() == markdown()
