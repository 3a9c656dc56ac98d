"""polyshift entry point: ``python launcher/run.py RECIPE [--set a.b=v ...] [--dry-run]``."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from config.errors import TrainingDiverged, UserError, WorkersFailed
from config.recipe import RecipeError, dump_recipe, load_recipe
from config.schema import Recipe


def preflight(recipe: Recipe) -> None:
    """Checks that need the filesystem or the method registry, done before any work or run
    directory exists."""
    from methods.registry import backbone_errors, recipe_errors

    _raise_first(recipe_errors(recipe))
    for section in ("train", "eval"):
        for i, source in enumerate(getattr(recipe.data, section)):
            path = Path(source.path).expanduser()
            looks_local = source.path.startswith((".", "/", "~")) or path.suffix in (
                ".jsonl",
                ".json",
                ".csv",
                ".parquet",
            )
            if looks_local and not path.exists():
                raise RecipeError(f"data.{section}.{i}.path: {source.path} does not exist")
    backbone = recipe.model.backbone
    config_file = Path(backbone).expanduser() / "config.json"
    layers = None  # known before any work only for a local backbone
    if config_file.is_file():
        layers = json.loads(config_file.read_text()).get("num_hidden_layers")
    if isinstance(layers, int):
        _raise_first(backbone_errors(recipe.method, layers))
    looks_local = backbone.startswith((".", "/", "~")) or backbone.endswith(".gguf")
    if looks_local and not Path(backbone).expanduser().exists():
        raise RecipeError(f"model.backbone: {backbone} does not exist")
    if recipe.parallel.engine == "megatron":
        errors = megatron_layout_errors(recipe)
        if errors:
            raise RecipeError("invalid layout\n  " + "\n  ".join(errors))


def _raise_first(errors: list[str]) -> None:
    if errors:
        raise RecipeError(errors[0])


def megatron_layout_errors(recipe: Recipe) -> list[str]:
    """TP/PP against the backbone's shape (its local config, else the known-architecture table;
    a hub id that is neither is checked when the engine reads its config)."""
    from parallel.arch import UnknownArch, resolve_arch
    from parallel.megatron_model import layout_errors

    try:
        arch = resolve_arch(recipe)
    except UnknownArch:
        return []
    p = recipe.parallel
    return layout_errors(
        arch.layers, arch.heads, arch.kv_heads, p.tensor_parallel, p.pipeline_parallel
    )


def dry_run(recipe: Recipe) -> None:
    from parallel.distributed import resolve_device
    from parallel.ds_config import build_deepspeed_config

    device = resolve_device(recipe.cluster.device)
    print("# resolved recipe")
    print(dump_recipe(recipe))
    if recipe.parallel.engine == "megatron":
        p = recipe.parallel
        layout = {
            "tensor_parallel": p.tensor_parallel,
            "pipeline_parallel": p.pipeline_parallel,
            "data_parallel": recipe.data_parallel_size,
            "micro_batches_per_step": recipe.grad_accum_steps,
            "sequence_parallel": p.sequence_parallel,
            "distributed_optimizer": p.distributed_optimizer,
        }
        print(f"# resolved megatron layout (device: {device})")
        print(json.dumps(layout, indent=2))
        return
    print(f"# resolved DeepSpeed config (device: {device})")
    print(json.dumps(build_deepspeed_config(recipe, device), indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="polyshift", description=__doc__)
    parser.add_argument("recipe", help="YAML recipe")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a recipe field (repeatable), e.g. --set training.steps=10",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the resolved configs")
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        preflight(recipe)
    except RecipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        dry_run(recipe)
        return 0

    run_dir = Path(recipe.output_dir) / recipe.name
    run_dir.mkdir(parents=True, exist_ok=True)
    from launcher.ray_launch import choose_launcher
    from launcher.run_lock import run_dir_lock

    mode = choose_launcher(recipe.cluster)  # a worker already (RANK set), Ray, or local
    # The job's driver holds the run directory; of processes started as workers (torchrun,
    # srun: RANK set), rank 0 does.
    holds_lock = os.environ.get("RANK", "0") == "0"
    try:
        with run_dir_lock(run_dir) if holds_lock else contextlib.nullcontext():
            (run_dir / "recipe.yaml").write_text(dump_recipe(recipe), encoding="utf-8")
            _launch(mode, recipe, run_dir)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (WorkersFailed, TrainingDiverged) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


def _launch(mode: str, recipe: Recipe, run_dir: Path) -> None:
    if mode == "ray":
        from launcher.ray_launch import launch_ray_workers

        launch_ray_workers(recipe, run_dir)
    elif mode == "local":
        from launcher.local import launch_local_workers

        launch_local_workers(recipe, run_dir)
    else:
        from launcher.loop import run_training

        run_training(recipe, run_dir)


if __name__ == "__main__":
    sys.exit(main())
