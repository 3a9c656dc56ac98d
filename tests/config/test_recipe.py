"""Recipe validation: every class of bad input fails early, naming the field, with no traceback."""

from __future__ import annotations

import json
import string

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from config.recipe import RecipeError, apply_override, load_recipe, parse_override
from config.schema import Recipe
from tests.helpers.runs import ROOT, run_cli, tiny_recipe, write_recipe


def _write(tmp_path, tree) -> str:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tree) if not isinstance(tree, str) else tree)
    return str(path)


def test_defaults_are_complete():
    recipe = Recipe(name="x")
    assert recipe.method.name == "sft"
    assert recipe.grad_accum_steps == recipe.training.global_batch_size
    assert recipe.parallel.zero_stage == 3


@pytest.mark.parametrize(
    ("tree", "expected"),
    [
        ({"name": "x", "trainig": {}}, "trainig: unknown key"),
        ({"name": "x", "training": {"stepz": 3}}, "training.stepz: unknown key"),
        (
            {"name": "x", "training": {"steps": 0}},
            "training.steps: Input should be greater than or equal to 1",
        ),
        ({"name": "x", "training": {"lr": "fast"}}, "training.lr: Input should be a valid number"),
        ({"name": "x", "parallel": {"zero_stage": 4}}, "parallel.zero_stage"),
        ({"name": "x", "method": {"name": "magic"}}, "method"),
        (
            {"name": "x", "data": {"train": [{"path": "a.jsonl", "colour": 1}]}},
            "data.train.0.colour",
        ),
        ({"name": "x", "data": {"on_bad_row": "ignore"}}, "data.on_bad_row"),
        ({"name": "a b"}, "name: must be letters"),
        (
            {"name": "x", "training": {"global_batch_size": 6, "micro_batch_size": 4}},
            "training.global_batch_size: 6 is not divisible by micro_batch_size x data-parallel",
        ),
        (
            {
                "name": "x",
                "cluster": {"workers_per_node": 4},
                "training": {"global_batch_size": 8, "micro_batch_size": 4},
            },
            "micro_batch_size x data-parallel size = 4 x 4 = 16",
        ),
        ({"name": "x", "training": {"warmup_steps": 50, "steps": 10}}, "warmup_steps (50)"),
        (
            {"name": "x", "parallel": {"tensor_parallel": 2}, "cluster": {"workers_per_node": 2}},
            "needs parallel.engine: megatron",
        ),
        (
            {"name": "x", "data": {"languages": ["fr"], "dominant_language": "en"}},
            "data.dominant_language",
        ),
    ],
)
def test_bad_recipes_name_the_field(tmp_path, tree, expected):
    with pytest.raises(RecipeError) as err:
        load_recipe(_write(tmp_path, tree))
    assert expected in str(err.value)


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = _write(tmp_path, "name: x\ntraining:\n  steps: [1, 2\n")
    with pytest.raises(RecipeError, match=r"r\.yaml:\d+:\d+: invalid YAML"):
        load_recipe(path)


def test_top_level_must_be_a_mapping(tmp_path):
    with pytest.raises(RecipeError, match="a recipe is a mapping"):
        load_recipe(_write(tmp_path, "- 1\n- 2\n"))


def test_overrides_are_typed_and_checked(tmp_path):
    path = _write(tmp_path, {"name": "x"})
    recipe = load_recipe(path, ["training.lr=3e-4", "training.steps=7", "data.languages=[en, fr]"])
    assert recipe.training.lr == pytest.approx(3e-4)
    assert recipe.training.steps == 7
    assert recipe.data.languages == ["en", "fr"]
    with pytest.raises(RecipeError, match="training.micro_batch_size"):
        load_recipe(path, ["training.micro_batch_size=-1"])
    with pytest.raises(RecipeError, match="expected KEY.PATH=VALUE"):
        load_recipe(path, ["training.steps"])
    with pytest.raises(RecipeError, match="training.steps is a value"):
        load_recipe(path, ["training.steps=3", "training.steps.x=1"])


def test_override_into_list_items():
    tree = {"data": {"train": [{"path": "a"}]}}
    apply_override(tree, *parse_override("data.train.0.path=b.jsonl"))
    assert tree["data"]["train"][0]["path"] == "b.jsonl"
    with pytest.raises(RecipeError, match="index '3'"):
        apply_override(tree, *parse_override("data.train.3.path=c"))


def test_shipped_recipes_validate():
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        load_recipe(path)


_keys = st.text(alphabet=string.ascii_lowercase + "_", min_size=1, max_size=12)
_values = st.one_of(st.integers(-5, 5), st.floats(allow_nan=False), st.text(max_size=5), st.none())


@settings(max_examples=150, deadline=None)
@given(
    section=st.sampled_from(["training", "parallel", "data", "cluster", "checkpoint"]),
    key=_keys,
    value=_values,
)
def test_fuzzed_recipes_either_validate_or_fail_cleanly(tmp_path_factory, section, key, value):
    """Random fields and values: never a crash, only a RecipeError that names the field path."""
    path = tmp_path_factory.mktemp("fz") / "r.yaml"
    path.write_text(yaml.safe_dump({"name": "x", section: {key: value}}))
    try:
        recipe = load_recipe(path)
    except RecipeError as exc:
        assert (
            f"{section}.{key}" in str(exc) or f"{section}:" in str(exc) or "training." in str(exc)
        )
    else:
        assert key in type(getattr(recipe, section)).model_fields


@pytest.mark.slow
def test_cli_rejects_bad_recipe_without_traceback_or_run_dir(tmp_path, tiny_model_dir):
    recipe = tiny_recipe(tiny_model_dir, tmp_path, training={"global_batch_size": 3})
    path = write_recipe(tmp_path / "bad.yaml", recipe)
    proc = run_cli(str(path), cwd=tmp_path)
    assert proc.returncode == 2
    assert "training.global_batch_size: 3 is not divisible" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_cli_rejects_missing_data_file(tmp_path, tiny_model_dir):
    recipe = tiny_recipe(tiny_model_dir, tmp_path)
    recipe["data"]["train"] = [{"path": str(tmp_path / "nope.jsonl")}]
    proc = run_cli(str(write_recipe(tmp_path / "r.yaml", recipe)), cwd=tmp_path)
    assert proc.returncode == 2 and "data.train.0.path" in proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_dry_run_prints_recipe_and_deepspeed_config(tmp_path, tiny_model_dir):
    recipe = tiny_recipe(tiny_model_dir, tmp_path)
    recipe["parallel"] = {"deepspeed": {"zero_optimization": {"reduce_bucket_size": 12345}}}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    proc = run_cli(str(path), "--dry-run", "--set", "training.steps=9", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    recipe_part, ds_part = proc.stdout.split("# resolved DeepSpeed config")
    assert yaml.safe_load(recipe_part)["training"]["steps"] == 9
    ds = json.loads(ds_part[ds_part.index("{") :])
    assert ds["train_batch_size"] == 4 and ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["reduce_bucket_size"] == 12345  # raw override merged
    assert ds["bf16"]["enabled"] is False  # fp32 on CPU
    assert not (tmp_path / "runs").exists()
