"""One training process: reads the run directory's resolved recipe and runs the loop."""

from __future__ import annotations

import sys
from pathlib import Path

from config.errors import TrainingDiverged, UserError
from config.recipe import load_recipe
from launcher.loop import run_training
from parallel.distributed import exit_finished_rank


def main(run_dir: str) -> int:
    path = Path(run_dir)
    try:
        run_training(load_recipe(path / "recipe.yaml"), path)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    exit_finished_rank()  # one of several local workers (launcher/local.py): see its docstring


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
