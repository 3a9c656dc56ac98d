"""`python -m launcher.evaluate --harness lm-eval`: lm-evaluation-harness tasks on an export.

    python -m launcher.evaluate --harness lm-eval --tasks xcopa_sw,mgsm_sw \\
        --model runs/x/export --data-dir ../shared/data [--limit 20] [--track]

Tasks are lm-eval names; ``xcopa`` / ``mgsm`` with ``--languages sw,zh`` expand to
``xcopa_sw, xcopa_zh, ...``. Our benchmarks run offline on the data dir's files
(``eval.lm_eval_tasks``), any other lm-eval task as lm-eval defines it. The results go through
the native path's ``publish``: the same table, JSON, charts and MLflow metrics
(``eval/xcopa/acc/sw``), plus lm-eval's own results as ``eval/lm_eval_results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from config.schema import EvalSection
from eval.benchmarks import shared_data_dir
from eval.lm_eval_tasks import FAMILIES

# EvalSection fields that mean the same under lm-eval (validated by the same schema).
_SHARED = ("data_dir", "limit", "batch_size", "max_new_tokens", "max_length", "system_prompt")


def lm_eval_tasks(tasks: str | None, languages: str | None) -> list[str]:
    """Task names from ``--tasks``; a bare ``xcopa``/``mgsm`` takes one task per language."""
    names = [t.strip() for t in (tasks or "").split(",") if t.strip()]
    langs = [c.strip() for c in (languages or "").split(",") if c.strip()]
    if not names:
        raise ValueError("--harness lm-eval needs --tasks (lm-eval names, e.g. xcopa_sw,mgsm_sw)")
    out: list[str] = []
    for name in names:
        if name in FAMILIES:
            if not langs:
                raise ValueError(f"--tasks {name}: name the languages ({name}_sw) or --languages")
            out += [f"{name}_{lang}" for lang in langs]
        else:
            out.append(name)
    return list(dict.fromkeys(out))


def run_lm_eval(args: argparse.Namespace, make_tracker: Callable[[argparse.Namespace], Any]) -> int:
    """The lm-eval branch of ``launcher.evaluate.main``; exit status 2 on bad input."""
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("--harness lm-eval runs in one process (no torchrun)")
        if args.files:
            raise ValueError("--file is for the native tasks; lm-eval reads --data-dir")
        tasks = lm_eval_tasks(args.tasks, args.languages)
        given = {k: getattr(args, k) for k in _SHARED if getattr(args, k) is not None}
        options = EvalSection(**given)
        data_dir = shared_data_dir(options.data_dir)
        out = Path(args.out) if args.out else None
        task_dir = out.parent if out else Path(tempfile.mkdtemp(prefix="polyshift-lm-eval-"))
        from eval.harness import task_manager

        manager = task_manager(tasks, data_dir=data_dir, task_dir=task_dir / "lm_eval_tasks",
                               max_new_tokens=options.max_new_tokens)  # fmt: skip
    except ValueError as exc:  # BenchmarkError and pydantic's ValidationError are ValueErrors
        print(f"error: {exc}", file=sys.stderr)
        return 2

    import lm_eval

    from eval.harness import PolyshiftLM, run_tasks
    from eval.suite import publish

    try:
        lm = PolyshiftLM(args.model, lang=args.shift_language, shift=not args.no_shift,
                         batch_size=options.batch_size, max_length=options.max_length,
                         dtype=args.dtype, attn=args.attn)  # fmt: skip
        results, raw = run_tasks(lm, tasks, data_dir=data_dir, task_dir=task_dir / "lm_eval_tasks",
                                 limit=options.limit, max_new_tokens=options.max_new_tokens,
                                 apply_chat_template=args.apply_chat_template,
                                 system_instruction=options.system_prompt,
                                 manager=manager)  # fmt: skip
    except ValueError as exc:  # a bad --model (BackboneError), a bad benchmark row
        print(f"error: {exc}", file=sys.stderr)
        return 2
    own = {k: raw.get(k, {}) for k in ("results", "n-samples", "versions")}
    meta = {"harness": "lm-eval", "lm_eval_version": lm_eval.__version__, "model": str(args.model),
            "tasks": tasks, "limit": options.limit, "shift": lm.shifted is not None,
            "shift_languages": lm.languages, "world_size": 1}  # fmt: skip
    with make_tracker(args) as tracker:
        tracker.start(params={"eval": meta})
        publish(results, {}, meta, tracker, out)
        tracker.log_dict(json.loads(json.dumps(own, default=str)), "eval/lm_eval_results.json")
    if out is not None:
        path = out.parent / "lm_eval_results.json"
        path.write_text(json.dumps(own, indent=2, default=str, ensure_ascii=False))
    return 0
