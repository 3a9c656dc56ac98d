"""Helpers shared by the tests that run the launcher: recipes for the tiny model, a fresh-interpreter
CLI call, and readers for what a run leaves behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]

# Set by in-process distributed tests; a fresh job must not inherit them (it would think it is
# already one worker of a group).
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

LANGS = ["en", "fr", "sw"]


def tiny_recipe(model_dir: Path, out: Path, **sections) -> dict:
    """A recipe dict for a few fast steps of the tiny model on the built-in data."""
    recipe = {
        "name": "tiny",
        "output_dir": str(out / "runs"),
        "model": {"backbone": str(model_dir)},
        "data": {
            "train": [{"path": "builtin:polyglot?items=40&seed=0"}],
            "languages": list(LANGS),
            "max_length": 160,
            "eval_samples_per_language": 4,
        },
        "training": {
            "steps": 4,
            "global_batch_size": 4,
            "micro_batch_size": 2,
            "lr": 1e-3,
            "schedule": "constant",
            "eval_batch_size": 4,
        },
        "tracking": {"enabled": False},
        "checkpoint": {"every": 0, "keep_last": 2},
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(recipe.get(section), dict):
            recipe[section] = {**recipe[section], **values}
        else:
            recipe[section] = values
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in DIST_VARS}


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600):
    """`python launcher/run.py ...` in a fresh interpreter, as a user would run it (the timeout
    is generous: on a busy 2-core machine a short run can take minutes)."""
    full_env = {**clean_env(), **(env or {})}
    full_env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, str(ROOT / "launcher" / "run.py"), *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def train(tmp_path: Path, model_dir: Path, name: str, *sets: str, env=None, **sections):
    """Run the launcher on the tiny recipe (plus `--set` overrides); returns (process, run dir)."""
    recipe = tiny_recipe(model_dir, tmp_path, **sections)
    recipe["name"] = name
    path = write_recipe(tmp_path / f"{name}.yaml", recipe)
    args = [a for s in sets for a in ("--set", s)]
    proc = run_cli(str(path), *args, cwd=tmp_path, env=env)
    return proc, tmp_path / "runs" / name


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "export" / "model.safetensors")


def run_data(tokenizer):
    """The tiny recipe's data section, built in-process."""
    from config.schema import DataSection, DataSource
    from data.pipeline import build_run_data

    section = DataSection(
        train=[DataSource(path="builtin:polyglot?items=40&seed=0")],
        languages=list(LANGS),
        max_length=160,
        eval_samples_per_language=4,
    )
    return build_run_data(section, tokenizer)


def run_session_helper(module: str, run_dir: Path, workdir: Path, timeout: int = 300):
    """``python -m <module> RUN_DIR OUT.pt`` in a fresh interpreter (DeepSpeed's global state
    stays out of the test process); returns what it saved (tensors and plain values only)."""
    out = workdir / f"{module.rsplit('.', 1)[-1]}.pt"
    env = {**clean_env(), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", module, str(run_dir), str(out)],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=True)
