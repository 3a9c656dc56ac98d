"""Print a recipe's cluster fields for shell wrappers (sbatch), which cannot parse YAML.

    python -m launcher.cluster_info RECIPE [--set a.b=v ...]
    -> "<workers_per_node> <max_failures> <nodes>"

The overrides are the ones run.py will get, so the wrapper starts exactly the processes the
resolved recipe asks for.
"""

from __future__ import annotations

import argparse
import sys

from config.errors import UserError
from config.recipe import load_recipe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.cluster_info")
    parser.add_argument("recipe")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args, _ = parser.parse_known_args(argv)  # run.py options besides --set are not ours
    try:
        cluster = load_recipe(args.recipe, args.overrides).cluster
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(cluster.workers_per_node, cluster.max_failures, cluster.nodes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
