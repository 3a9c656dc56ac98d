"""A LoRA recipe the build cannot run stops in the CLI's preflight, naming the field, before a
run directory exists (in-process: the preflight starts nothing)."""

from __future__ import annotations

import pytest

from launcher.run import main
from tests.helpers.runs import tiny_recipe, write_recipe


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["parallel.engine=megatron"], "lora.enabled: LoRA runs on the deepspeed engine only"),
        (["method=lens"], "lora.enabled: method lens chooses its own trainable weights"),
        (["lora.quantize=nf4"], "lora.quantize: nf4 (QLoRA) needs bitsandbytes on a CUDA device"),
        (["lora.layers=[1, 1]"], "lora.layers: layer numbers repeat"),
    ],
)
def test_refused_before_the_run_dir(tmp_path, tiny_model_dir, capsys, sets, message):
    recipe = tiny_recipe(tiny_model_dir, tmp_path, lora={"enabled": True})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    args = [a for s in sets for a in ("--set", s)]
    assert main([str(path), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_deepspeed_lora_recipe_passes_the_preflight(tmp_path, tiny_model_dir, capsys):
    recipe = tiny_recipe(tiny_model_dir, tmp_path, lora={"enabled": True, "layers": [2, 3]})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    assert main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "lora:\n  enabled: true" in out and "  - 2\n  - 3" in out
