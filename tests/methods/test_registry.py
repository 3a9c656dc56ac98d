"""The method registry: one entry per recipe method section, and the recipe errors it owns
(raised by the launcher's preflight, before any run directory exists)."""

from __future__ import annotations

import json
import typing

import pytest

from config.errors import UserError
from config.recipe import RecipeError, validate_recipe
from config.schema import METHOD_NAMES, Recipe
from launcher.run import main as run_main
from launcher.run import preflight
from methods.base import MegatronStage
from methods.registry import METHODS, megatron_stage_class, plan_extras, recipe_errors
from tests.helpers.runs import tiny_recipe, write_recipe


def test_every_recipe_method_section_has_one_entry() -> None:
    union = typing.get_args(Recipe.model_fields["method"].annotation)
    assert {e.section for e in METHODS.values()} == set(union)
    assert tuple(METHODS) == METHOD_NAMES
    for name, entry in METHODS.items():
        assert entry.name == name
        assert typing.get_args(entry.section.model_fields["name"].annotation) == (name,)


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A 4-layer backbone as preflight sees it: its config.json (no weights are read)."""
    directory = tmp_path / "backbone"
    directory.mkdir()
    config = {"model_type": "llama", "num_hidden_layers": 4, "hidden_size": 32,
              "intermediate_size": 48, "num_attention_heads": 4, "num_key_value_heads": 2,
              "vocab_size": 100}  # fmt: skip
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def _recipe(tmp_path, model_dir, method, engine="megatron") -> Recipe:
    tree = tiny_recipe(model_dir, tmp_path, method=method, parallel={"engine": engine},
                       cluster={"device": "cpu"})  # fmt: skip
    return validate_recipe(tree)


@pytest.mark.parametrize(
    ("method", "message"),
    [
        (
            {"name": "shifcon", "band": [1, 3], "shift_positions": "prompt"},
            "method.shift_positions: prompt needs the deepspeed engine (the megatron stage "
            "shifts every position)",
        ),
    ],
)
def test_methods_name_what_the_megatron_engine_cannot_run(tmp_path, tiny_model_dir, method,
                                                          message, capsys) -> None:  # fmt: skip
    recipe = _recipe(tmp_path, tiny_model_dir, method)
    assert recipe_errors(recipe) == [message]
    with pytest.raises(RecipeError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        preflight(recipe)
    assert recipe_errors(_recipe(tmp_path, tiny_model_dir, method, engine="deepspeed")) == []
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(
        tiny_model_dir, tmp_path, method=method, parallel={"engine": "megatron"}))  # fmt: skip
    assert run_main([str(path)]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not (tmp_path / "runs").exists()


def test_megatron_stages_come_from_the_registry(tmp_path, tiny_model_dir) -> None:
    from methods.lens_megatron import LensStage

    assert megatron_stage_class("sft") is MegatronStage
    assert megatron_stage_class("lens") is LensStage
    assert recipe_errors(_recipe(tmp_path, tiny_model_dir, {"name": "lens"})) == []
    with pytest.raises(UserError, match="method.name: no implementation for 'x'"):
        megatron_stage_class("x")


def test_backbone_misfits_are_field_errors(tmp_path, tiny_model_dir) -> None:
    """The tiny model has 4 layers: band (1, 4) and top_k 4 do not fit."""
    shifcon = _recipe(tmp_path, tiny_model_dir, {"name": "shifcon", "band": [1, 4]}, "deepspeed")
    with pytest.raises(RecipeError, match=r"method.band: \(1, 4\) does not fit the 4-layer"):
        preflight(shifcon)
    lens = _recipe(tmp_path, tiny_model_dir, {"name": "lens", "top_k": 4}, "deepspeed")
    with pytest.raises(RecipeError, match="method.top_k: 4 must be below the backbone's 4 layers"):
        preflight(lens)


def test_plan_extras_of_shifcon() -> None:
    recipe = Recipe.model_validate(
        {"name": "x", "method": {"name": "shifcon", "band": [3, 9], "mcl_batch_size": 6}}
    )
    extra = plan_extras(recipe.method, 30)
    assert (extra.sequences, extra.seq_len, extra.depth) == (12, 128, 8)
    auto = Recipe.model_validate({"name": "x", "method": {"name": "shifcon", "band": "auto"}})
    assert plan_extras(auto.method, 30).depth == 28  # the deepest band the probe may choose
    assert plan_extras(Recipe(name="x").method, 30) is None
