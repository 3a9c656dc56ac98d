"""CLI of the benchmark suite: `python -m launcher.evaluate --model DIR --tasks xcopa,bitext --languages sw,zh`.

`--harness lm-eval --tasks xcopa_sw,mgsm_sw` runs lm-evaluation-harness tasks instead (eval.harness):
the same table, JSON, charts and MLflow metrics as our own tasks.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from config.cli import bounded_int, run_cli
from config.errors import UserError
from config.schema import EvalSection, ModelSection
from eval.benchmarks import BenchmarkError
from eval.suite import TASKS, check_data, evaluate, publish, shifcon_hooks
from model.layers import rank_world

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

# Where the CLI differs from the recipe's eval section (there the run's languages are the default).
_FLAG_HELP = {
    "--languages": "comma-separated benchmark languages, e.g. sw,zh (required with --harness "
    "native; no default: the CLI has no run whose languages it could take)",
    "--tasks": "comma-separated tasks (xcopa, mgsm, bitext, ppl); default: all four",
}


def _help(name: str) -> str:
    info = EvalSection.model_fields[name]
    default = info.get_default(call_default_factory=True)
    text = info.description or ""
    return f"{text} (eval.{name}; default {default!r})" if default not in (None, []) else text


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m launcher.evaluate", description=__doc__.split("\n")[0]
    )
    p.add_argument("--model", required=True, help="export dir, HF dir, .gguf or embedded:NAME")
    for flag, name in _FLAGS.items():
        p.add_argument(flag, dest=name, default=None, help=_FLAG_HELP.get(flag) or _help(name),
                       type=bounded_int(1, 2**30) if name in _INTS else None)  # fmt: skip
    p.add_argument("--file", dest="files", action="append", default=[], metavar="TASK=PATTERN",
                   help=_help("files"))  # fmt: skip
    p.add_argument("--no-chat", action="store_true", help="raw prompts, no chat template")
    p.add_argument(
        "--no-shift", action="store_true", help="a ShifCon export without its shift (baseline)"
    )
    p.add_argument("--harness", choices=("native", "lm-eval"), default="native",
                   help="native: our tasks (--languages required); lm-eval: lm-evaluation-harness "
                   "tasks by name (xcopa_sw, mgsm_sw on --data-dir; others from lm-eval)")  # fmt: skip
    p.add_argument("--shift-language", default=None, metavar="LANG|auto",
                   help="lm-eval: shift every prompt by LANG ('auto': detect each prompt); "
                   "default: the task name's language, else detected")  # fmt: skip
    p.add_argument("--apply-chat-template", action="store_true",
                   help="lm-eval: format prompts with the model's chat template (lm-eval's "
                   "--apply_chat_template); default: raw prompts, as lm-eval scores them")  # fmt: skip
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


# Counts are ints from argparse: the schema's counts are strict (a YAML bool must not pass as 1).
_INTS = ("limit", "batch_size", "max_new_tokens", "max_length")


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
            raise UserError(f"--file {item!r}: expected TASK=PATTERN")
        files[task.strip()] = pattern
    if files:
        given["files"] = files
    given["chat"] = not args.no_chat
    given["shift"] = not args.no_shift
    given.setdefault("tasks", list(TASKS))  # the CLI runs every task unless told otherwise
    if not given["tasks"]:
        raise UserError("--tasks: none given; choose from " + ", ".join(TASKS))
    return EvalSection(**given)


@run_cli
def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from launcher.preflight import check_backbone

    if args.harness == "lm-eval":
        from launcher.lm_eval_cli import run_lm_eval

        check_backbone(ModelSection(backbone=args.model), "--model")

        return run_lm_eval(args, _tracker)
    if args.languages is None:
        print("error: --languages is required (e.g. --languages sw,zh)", file=sys.stderr)
        return 2
    try:
        options = options_from_args(args)
        check_data(options)
    except ValueError as exc:  # pydantic's ValidationError and BenchmarkError are ValueErrors
        print(f"error: {exc}", file=sys.stderr)
        return 2
    check_backbone(ModelSection(backbone=args.model), "--model")  # before any model load

    import torch

    from eval.scorer import HFScorer, load_model

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from parallel.distributed import init_distributed, resolve_device

        init_distributed(resolve_device("auto"))
    rank, world = rank_world()
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
    with _tracker(args) as tracker:
        tracker.start(params={"eval": {**meta, "tasks": options.tasks}})
        publish(results, skipped, meta, tracker, Path(args.out) if args.out else None)
    return 0


def _tracker(args: argparse.Namespace) -> Any:
    """The MLflow tracker of an evaluation (inactive unless --track or --tracking-uri)."""
    from launcher.tracking import Tracker

    return Tracker(
        enabled=bool(args.tracking_uri or args.track),
        is_rank0=True,
        tracking_uri=args.tracking_uri,
        experiment=args.experiment,
        run_name=args.run_name,
        log_system_metrics=False,
    )


if __name__ == "__main__":
    raise SystemExit(main())
