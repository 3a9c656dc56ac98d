"""Evaluate a model on the shared benchmarks and print a per-language table.

    python -m launcher.evaluate --model runs/demo_smollm2/export --tasks xcopa,mgsm,bitext,ppl \\
        --languages sw,zh --limit 20 [--data-dir ../shared/data] [--out results.json] \\
        [--tracking-uri http://127.0.0.1:5000]

``--model`` takes an export directory or anything ``model.backbone`` takes (a HF directory, a
``.gguf`` file, ``embedded:smollm2-135m-instruct``). Under ``torchrun`` the rows are split
over the ranks and the counts are summed (``eval.tasks``); rank 0 prints and logs.
A language a task has no data for is skipped with a note, not an error, so one language list
can serve every task (XCOPA and MGSM cover different languages).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from config.schema import EVAL_TASKS, EvalSection
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
)
from model.layers import rank_world

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
    if rank_world()[0] == 0:
        print(message, file=sys.stderr, flush=True)


def shifcon_hooks(model: Any, spec: str | Path) -> Any:
    """A ShifCon export is evaluated as it generates: with its shift on (`--no-shift`: off)."""
    from methods.shifcon.method import META_FILE, ShifConHooks, load_shifcon

    directory = Path(spec)
    if not (directory / META_FILE).is_file():
        return None
    meta, stats = load_shifcon(directory)
    positions = str(meta.get("shift_positions", "all"))
    hooks = ShifConHooks(model, tuple(meta["band"]), dominant=0, positions=positions)
    hooks.set_vectors(stats)
    return hooks


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
