"""One training process: reads the run directory's resolved recipe and runs the loop."""

from __future__ import annotations

import sys
from pathlib import Path

from launcher.loop import run_training
from launcher.recipe import load_recipe


def main(run_dir: str) -> None:
    path = Path(run_dir)
    recipe = load_recipe(path / "recipe.yaml")
    run_training(recipe, path)


if __name__ == "__main__":
    main(sys.argv[1])
