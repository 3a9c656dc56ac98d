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

from config.cli import run_cli
from config.errors import TrainingDiverged, WorkersFailed
from config.recipe import RecipeError, dump_recipe, load_recipe
from config.schema import Recipe


def preflight(recipe: Recipe, *, dry_run: bool = False, mode: str | None = None) -> str:
    """Checks that need the filesystem, the machine or the method registry, done before any
    work or run directory exists; returns the device the recipe runs on here ("cpu"/"cuda").

    Order: what the method needs, the backbone's shape (config.json), then the backbone's
    files, data, pairs and benchmark files, the device, output_dir and the raw DeepSpeed block.
    """
    from launcher import preflight as pf
    from methods.registry import backbone_errors, recipe_errors

    _raise_first(recipe_errors(recipe))
    backbone = recipe.model.backbone
    config_file = Path(backbone).expanduser() / "config.json"
    if config_file.is_file() and not recipe.model.gguf_file:
        config = pf.read_json_file(config_file, "model.backbone")
        layers = config.get("num_hidden_layers") if isinstance(config, dict) else None
        if isinstance(layers, int) and not isinstance(layers, bool):
            _raise_first(backbone_errors(recipe.method, layers))
    pf.check_backbone(recipe.model, download=not dry_run)
    for section in ("train", "eval"):
        for i, source in enumerate(getattr(recipe.data, section)):
            pf.check_data_source(source.path, f"data.{section}.{i}.path")
    pf.check_languages(recipe)
    pairs = getattr(recipe.method, "pairs", None)
    if pairs is not None and pairs.path != "train":
        pf.check_data_source(pairs.path, "method.pairs.path")
    prompts = getattr(recipe.method, "prompts", None)
    if prompts is not None and prompts.path != "train":
        pf.check_data_source(prompts.path, "method.prompts.path")
    _check_benchmark_files(recipe)
    if recipe.parallel.engine == "megatron":
        errors = megatron_layout_errors(recipe)
        if errors:
            raise RecipeError("invalid layout\n  " + "\n  ".join(errors))
    if mode is None:
        from launcher.ray_launch import choose_launcher

        mode = choose_launcher(recipe.cluster)
    device = pf.check_device(recipe, mode, dry_run=dry_run)
    pf.check_local_workers(recipe, mode, device)
    if not dry_run:
        pf.check_output_dir(recipe)
    if recipe.parallel.engine == "deepspeed" and recipe.parallel.deepspeed:
        from parallel.ds_config import build_deepspeed_config

        config = build_deepspeed_config(recipe, device)  # type: ignore[arg-type]
        pf.first_error(pf.deepspeed_block_errors(recipe, config, device))
    return device


def _check_benchmark_files(recipe: Recipe) -> None:
    """The ``eval:`` benchmark files, read now (all of them when the languages are known)."""
    if not recipe.eval.enabled:
        return
    languages = recipe.eval.languages or recipe.data.languages
    if languages:
        from types import SimpleNamespace

        from eval.engine import check_benchmarks

        check_benchmarks(SimpleNamespace(recipe=recipe, data=SimpleNamespace(languages=languages)))
        return
    from eval.benchmarks import BenchmarkError
    from eval.suite import check_data

    try:
        check_data(recipe.eval)
    except BenchmarkError as exc:
        raise RecipeError(f"eval: {exc}") from None


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


def dry_run(recipe: Recipe, device: str) -> None:
    """The resolved recipe and engine config, as the run on ``device`` would use them."""
    from parallel.ds_config import build_deepspeed_config

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
    print(json.dumps(build_deepspeed_config(recipe, device), indent=2))  # type: ignore[arg-type]


@run_cli
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
    recipe = load_recipe(args.recipe, args.overrides)
    from launcher.ray_launch import choose_launcher

    mode = choose_launcher(recipe.cluster)  # a worker already (RANK set), Ray, or local
    device = preflight(recipe, dry_run=args.dry_run, mode=mode)
    if args.dry_run:
        dry_run(recipe, device)
        return 0

    run_dir = Path(recipe.output_dir).expanduser() / recipe.name
    run_dir.mkdir(parents=True, exist_ok=True)
    from launcher.run_lock import run_dir_lock

    # The job's driver holds the run directory; of processes started as workers (torchrun,
    # srun: RANK set), rank 0 does.
    holds_lock = os.environ.get("RANK", "0") == "0"
    try:
        with run_dir_lock(run_dir) if holds_lock else contextlib.nullcontext():
            (run_dir / "recipe.yaml").write_text(dump_recipe(recipe), encoding="utf-8")
            _launch(mode, recipe, run_dir)
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
        from parallel.distributed import exit_finished_rank

        run_training(recipe, run_dir)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a rank under torchrun / srun
            exit_finished_rank()


if __name__ == "__main__":
    sys.exit(main())
