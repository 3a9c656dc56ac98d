from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.tiny import make_tiny_llama

ROOT = Path(__file__).resolve().parent.parent

# Tests never reach a hub, and never write into the user's cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


def tiny_recipe(model_dir: Path, out: Path, **sections) -> dict:
    """A recipe dict for a few fast steps of the tiny model on the built-in data."""
    recipe = {
        "name": "tiny",
        "output_dir": str(out / "runs"),
        "model": {"backbone": str(model_dir)},
        "data": {
            "train": [{"path": "builtin:polyglot?items=40&seed=0"}],
            "languages": ["en", "fr", "sw"],
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


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 300):
    """`python launcher/run.py ...` in a fresh interpreter, as a user would run it."""
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, str(ROOT / "launcher" / "run.py"), *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
