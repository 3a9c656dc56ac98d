"""Evaluate a model on the shared benchmarks and print a per-language table.

    python -m eval.run --model runs/demo_smollm2/export --tasks xcopa,mgsm,bitext,ppl \\
        --languages sw,zh --limit 20 [--data-dir ../shared/data] [--out results.json] \\
        [--tracking-uri http://127.0.0.1:5000]

``--model`` takes an export directory or anything ``model.backbone`` takes (a HF directory, a
``.gguf`` file, ``embedded:smollm2-135m-instruct``). Under ``torchrun`` the rows are split
over the ranks and the counts are summed (``eval.tasks``); rank 0 prints and logs.
A language a task has no data for is skipped with a note, not an error, so one language list
can serve every task (XCOPA and MGSM cover different languages).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eval.benchmarks import (
    TASK_FILES,
    BenchmarkError,
    MissingBenchmark,
    benchmark_file,
    load_mgsm,
    load_parallel,
    load_texts,
    load_xcopa,
    shared_data_dir,
)
from eval.scorer import Scorer
from eval.tasks import (
    DEFAULT_MGSM_TEMPLATE,
    TaskResult,
    evaluate_bitext,
    evaluate_mgsm,
    evaluate_perplexity,
    evaluate_xcopa,
    rank_and_world,
)

TASKS = ("xcopa", "mgsm", "bitext", "ppl")


@dataclass
class EvalOptions:
    """Everything an evaluation needs besides the model (what a recipe ``eval:`` section holds)."""

    tasks: list[str]
    languages: list[str]
    data_dir: Path = field(default_factory=shared_data_dir)
    limit: int | None = None
    max_new_tokens: int = 256
    mgsm_template: str = DEFAULT_MGSM_TEMPLATE
    pivot: str = "en"

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise ValueError(
                f"tasks: unknown {unknown or 'none given'}; choose from {', '.join(TASKS)}"
            )
        if not self.languages:
            raise ValueError("languages: give at least one language code")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        if "{question}" not in self.mgsm_template:
            raise ValueError("mgsm_template must contain {question}")


def _ppl_texts(data_dir: Path, lang: str, pivot: str, limit: int | None) -> list[str]:
    """Target-language side of the parallel file; the pivot's side of the first file for the pivot."""
    if lang != pivot:
        return load_texts(benchmark_file(data_dir, "ppl", lang), "target", limit)
    folder = data_dir / TASK_FILES["ppl"].rsplit("/", 1)[0]
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        raise MissingBenchmark(f"{folder}: no parallel files to take {pivot} text from")
    return load_texts(files[0], "en", limit)


def load_task_data(task: str, options: EvalOptions) -> tuple[dict[str, list[Any]], dict[str, str]]:
    """Rows per language for ``task`` and the languages skipped (with the reason)."""
    rows: dict[str, list[Any]] = {}
    skipped: dict[str, str] = {}
    loaders = {"xcopa": load_xcopa, "mgsm": load_mgsm, "bitext": load_parallel}
    for lang in options.languages:
        if task == "bitext" and lang == options.pivot:
            skipped[lang] = f"bitext pairs {options.pivot} with other languages"
            continue
        try:
            if task == "ppl":
                rows[lang] = _ppl_texts(options.data_dir, lang, options.pivot, options.limit)
            else:
                path = benchmark_file(options.data_dir, task, lang)
                rows[lang] = loaders[task](path, options.limit)
        except MissingBenchmark as exc:
            skipped[lang] = str(exc)
    return rows, skipped


def evaluate(scorer: Scorer, options: EvalOptions) -> tuple[dict[str, TaskResult], dict[str, Any]]:
    """Run every task; returns results by task and the skipped (task -> lang -> reason)."""
    results: dict[str, TaskResult] = {}
    skipped: dict[str, Any] = {}
    for task in options.tasks:
        data, missing = load_task_data(task, options)
        if missing:
            skipped[task] = missing
        if not data:
            continue
        if task == "xcopa":
            results[task] = evaluate_xcopa(scorer, data)
        elif task == "mgsm":
            results[task] = evaluate_mgsm(
                scorer, data, options.max_new_tokens, options.mgsm_template
            )
        elif task == "bitext":
            results[task] = evaluate_bitext(scorer, data)
        else:
            results[task] = evaluate_perplexity(scorer, data)
    return results, skipped


def shifcon_hooks(model: Any, spec: str | Path) -> Any:
    """A ShifCon export is evaluated as it generates: with its shift on (`--no-shift`: off)."""
    from model.shifcon import META_FILE, ShifConHooks, load_shifcon

    directory = Path(spec)
    if not (directory / META_FILE).is_file():
        return None
    meta, stats = load_shifcon(directory)
    hooks = ShifConHooks(model, tuple(meta["band"]), dominant=0)
    hooks.set_vectors(stats)
    return hooks


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.run", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="export dir, HF dir, .gguf or embedded:NAME")
    p.add_argument(
        "--tasks", default="xcopa,mgsm,bitext,ppl", help="comma-separated: " + ",".join(TASKS)
    )
    p.add_argument("--languages", required=True, help="comma-separated language codes")
    p.add_argument(
        "--data-dir",
        default=None,
        help="shared data (default: $POLYSHIFT_SHARED_DATA or ../shared/data)",
    )
    p.add_argument("--limit", type=int, default=None, help="first N rows per language and task")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--mgsm-template", default=DEFAULT_MGSM_TEMPLATE)
    p.add_argument("--no-chat", action="store_true", help="raw prompts, no chat template")
    p.add_argument(
        "--no-shift", action="store_true", help="a ShifCon export without its shift (baseline)"
    )
    p.add_argument("--system-prompt", default=None)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa")
    p.add_argument("--out", default=None, help="write results JSON here (charts beside it)")
    p.add_argument("--tracking-uri", default=None, help="log to this MLflow store/server")
    p.add_argument("--track", action="store_true", help="log to MLflow (default store ./mlflow.db)")
    p.add_argument("--experiment", default="polyshift-eval")
    p.add_argument("--run-name", default=None)
    return p


def _codes(text: str) -> list[str]:
    return [c.strip() for c in text.split(",") if c.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        options = EvalOptions(
            tasks=_codes(args.tasks),
            languages=_codes(args.languages),
            data_dir=shared_data_dir(args.data_dir),
            limit=args.limit,
            max_new_tokens=args.max_new_tokens,
            mgsm_template=args.mgsm_template,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not options.data_dir.is_dir():
        print(f"error: data dir {options.data_dir} does not exist (--data-dir)", file=sys.stderr)
        return 2

    import torch

    from eval.report import log_results, markdown_table, results_dict
    from eval.scorer import HFScorer, load_model
    from launcher.tracking import Tracker

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from parallel.distributed import init_distributed, resolve_device

        init_distributed(resolve_device("auto"))
    rank, world = rank_and_world()
    model, tokenizer = load_model(
        args.model, dtype=getattr(torch, args.dtype), attn_implementation=args.attn
    )
    shift = None if args.no_shift else shifcon_hooks(model, args.model)
    scorer = HFScorer(model, tokenizer, batch_size=args.batch_size, chat=not args.no_chat,
                      system_prompt=args.system_prompt, shift=shift)  # fmt: skip
    try:
        results, skipped = evaluate(scorer, options)
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if rank != 0:
        return 0
    for task, langs in skipped.items():
        for lang, reason in langs.items():
            print(f"note: {task}/{lang} skipped: {reason}", file=sys.stderr)
    table = markdown_table(results)
    print(table)
    meta = {"model": str(args.model), "languages": options.languages, "limit": options.limit,
            "world_size": world, "skipped": skipped}  # fmt: skip
    out_dir = Path(args.out).parent if args.out else None
    tracker = Tracker(
        enabled=bool(args.tracking_uri or args.track),
        is_rank0=True,
        tracking_uri=args.tracking_uri,
        experiment=args.experiment,
        run_name=args.run_name,
        log_system_metrics=False,
    )
    with tracker:
        tracker.start(params={"eval": {**meta, "tasks": options.tasks}})
        charts = log_results(results, tracker if tracker.active else None, out_dir=out_dir)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(
            json.dumps(results_dict(results, **meta), indent=2, ensure_ascii=False)
        )
        print(f"wrote {args.out} and {', '.join(str(c) for c in charts)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
