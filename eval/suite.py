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
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eval.benchmarks import (
    DATA_ENV,
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
from eval.report import log_results, markdown_table, results_dict
from eval.scorer import Scorer
from eval.tasks import (
    TaskResult,
    evaluate_bitext,
    evaluate_mgsm,
    evaluate_perplexity,
    evaluate_xcopa,
    rank_and_world,
)
from launcher.schema import EVAL_TASKS, EvalSection

TASKS = EVAL_TASKS
# The options of an evaluation are the recipe's ``eval:`` section: one definition for both.
EvalOptions = EvalSection


def with_languages(options: EvalSection, languages: Sequence[str]) -> EvalSection:
    """``options`` with its languages filled in (``eval.languages`` unset: the run's)."""
    if options.languages:
        return options
    return options.model_copy(update={"languages": list(languages)})


def task_file(options: EvalSection, task: str, lang: str) -> Path:
    """The benchmark file of ``task`` in ``lang``: the ``files`` pattern, else the data_dir
    layout (``eval.benchmarks.TASK_FILES``)."""
    pattern = options.files.get(task)  # type: ignore[call-overload]
    if pattern is None:
        return benchmark_file(shared_data_dir(options.data_dir), task, lang)
    path = Path(pattern.format(lang=lang)).expanduser()
    if not path.is_file():
        raise MissingBenchmark(f"{path}: no {task} data for language {lang!r} (eval.files)")
    return path


def _ppl_texts(options: EvalSection, lang: str) -> list[str]:
    """Target-language side of the parallel file; the pivot's side of the first file for the pivot."""
    if lang != options.pivot:
        return load_texts(task_file(options, "ppl", lang), "target", options.limit)
    pattern = options.files.get("ppl") or str(shared_data_dir(options.data_dir) / TASK_FILES["ppl"])
    folder = Path(pattern.format(lang=options.pivot)).expanduser().parent
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        raise MissingBenchmark(f"{folder}: no parallel files to take {options.pivot} text from")
    return load_texts(files[0], "en", options.limit)


def load_task_data(task: str, options: EvalOptions) -> tuple[dict[str, list[Any]], dict[str, str]]:
    """Rows per language for ``task`` and the languages skipped (with the reason)."""
    rows: dict[str, list[Any]] = {}
    skipped: dict[str, str] = {}
    loaders = {"xcopa": load_xcopa, "mgsm": load_mgsm, "bitext": load_parallel}
    if not options.languages:
        raise ValueError("eval.languages: no languages to evaluate")
    for lang in options.languages:
        if task == "bitext" and lang == options.pivot:
            skipped[lang] = f"bitext pairs {options.pivot} with other languages"
            continue
        try:
            if task == "ppl":
                rows[lang] = _ppl_texts(options, lang)
            else:
                rows[lang] = loaders[task](task_file(options, task, lang), options.limit)
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
        _progress(f"eval: {task} on {', '.join(data)} ({sum(len(r) for r in data.values())} rows)")
        start = time.perf_counter()
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
        _progress(f"eval: {task} done in {time.perf_counter() - start:.0f} s")
    return results, skipped


def _progress(message: str) -> None:
    """Long benchmark runs say what they are on (rank 0 only when distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        print(message, file=sys.stderr, flush=True)


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


# CLI flag -> EvalSection field (defaults, types and checks all come from the schema).
_FLAGS: dict[str, str] = {
    "--tasks": "tasks",
    "--languages": "languages",
    "--data-dir": "data_dir",
    "--limit": "limit",
    "--batch-size": "batch_size",
    "--max-new-tokens": "max_new_tokens",
    "--max-length": "max_length",
    "--mgsm-template": "mgsm_template",
    "--system-prompt": "system_prompt",
    "--pivot": "pivot",
}
_LISTS = ("tasks", "languages")


def _help(name: str) -> str:
    info = EvalSection.model_fields[name]
    default = info.get_default(call_default_factory=True)
    text = info.description or ""
    return f"{text} (eval.{name}; default {default!r})" if default not in (None, []) else text


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.run", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="export dir, HF dir, .gguf or embedded:NAME")
    for flag, name in _FLAGS.items():
        extra = {"required": True} if name == "languages" else {}
        p.add_argument(flag, dest=name, default=None, help=_help(name), **extra)
    p.add_argument("--file", dest="files", action="append", default=[], metavar="TASK=PATTERN",
                   help=_help("files"))  # fmt: skip
    p.add_argument("--no-chat", action="store_true", help="raw prompts, no chat template")
    p.add_argument(
        "--no-shift", action="store_true", help="a ShifCon export without its shift (baseline)"
    )
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


def options_from_args(args: argparse.Namespace) -> EvalSection:
    """The CLI's flags as the recipe's ``eval:`` section (validated by the same schema)."""
    given: dict[str, Any] = {}
    for name in _FLAGS.values():
        value = getattr(args, name)
        if value is not None:
            given[name] = _codes(value) if name in _LISTS else value
    files = {}
    for item in args.files:
        task, sep, pattern = item.partition("=")
        if not sep:
            raise ValueError(f"--file {item!r}: expected TASK=PATTERN")
        files[task.strip()] = pattern
    if files:
        given["files"] = files
    given["chat"] = not args.no_chat
    given["shift"] = not args.no_shift
    given.setdefault("tasks", list(TASKS))  # the CLI runs every task unless told otherwise
    if not given["tasks"]:
        raise ValueError("tasks: none given; choose from " + ", ".join(TASKS))
    return EvalSection(**given)


def check_data(options: EvalSection) -> None:
    """Stop before loading a model when the benchmark folder is missing."""
    if all(task in options.files for task in options.tasks):
        return
    folder = shared_data_dir(options.data_dir)
    if not folder.is_dir():
        raise BenchmarkError(
            f"data dir {folder} does not exist (eval.data_dir / --data-dir, or ${DATA_ENV})"
        )


def publish(
    results: dict[str, TaskResult],
    skipped: dict[str, Any],
    meta: dict[str, Any],
    tracker: Any,
    out: Path | None,
    *,
    step: int = 0,
) -> list[Path]:
    """Rank 0's side of an evaluation: notes and table printed, JSON and charts written beside
    ``out``, metrics and artifacts to ``tracker`` (None or inactive: not logged)."""
    for task, langs in skipped.items():
        for lang, reason in langs.items():
            print(f"note: {task}/{lang} skipped: {reason}", file=sys.stderr)
    print(markdown_table(results), flush=True)
    active = tracker if tracker is not None and getattr(tracker, "active", True) else None
    charts = log_results(results, active, step=step, out_dir=out.parent if out else None)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results_dict(results, **meta), indent=2, ensure_ascii=False))
        print(f"wrote {out} and {', '.join(str(c) for c in charts)}", flush=True)
    return charts


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        options = options_from_args(args)
        check_data(options)
    except ValueError as exc:  # pydantic's ValidationError and BenchmarkError are ValueErrors
        print(f"error: {exc}", file=sys.stderr)
        return 2

    import torch

    from eval.scorer import HFScorer, load_model
    from launcher.tracking import Tracker

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from parallel.distributed import init_distributed, resolve_device

        init_distributed(resolve_device("auto"))
    rank, world = rank_and_world()
    model, tokenizer = load_model(
        args.model, dtype=getattr(torch, args.dtype), attn_implementation=args.attn
    )
    shift = shifcon_hooks(model, args.model) if options.shift else None
    scorer = HFScorer(model, tokenizer, batch_size=options.batch_size, chat=options.chat,
                      system_prompt=options.system_prompt, max_length=options.max_length,
                      shift=shift)  # fmt: skip
    try:
        results, skipped = evaluate(scorer, options)
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if rank != 0:
        return 0
    meta = {"model": str(args.model), "languages": options.languages, "limit": options.limit,
            "world_size": world, "skipped": skipped}  # fmt: skip
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
        publish(results, skipped, meta, tracker, Path(args.out) if args.out else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
