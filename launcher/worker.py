"""One training process: reads the run directory's resolved recipe and runs the loop."""

from __future__ import annotations

import sys
from pathlib import Path

from config.errors import TrainingDiverged, UserError
from config.recipe import load_recipe
from launcher.loop import run_training
from parallel.distributed import shutdown_distributed


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
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
