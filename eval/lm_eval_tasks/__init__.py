"""lm-eval task configs for the shared benchmark files, so lm-evaluation-harness runs offline.

``xcopa.yaml`` and ``mgsm.yaml`` here are the bases (``dataset_path: json``); ``write_tasks``
generates one small task file per (benchmark, language) under a run's folder, filling
``data_files`` from the data dir (the shared data is read in place, never copied) and setting
the per-language prompt functions below. The functions reuse our own task code
(``eval.tasks``, ``eval.answers``), so an lm-eval run scores the same requests as ours.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from eval.answers import extract_number, numbers_match, parse_gold
from eval.benchmarks import XcopaRow, benchmark_file
from eval.tasks import DEFAULT_MGSM_TEMPLATE, mgsm_prompt, xcopa_request

HERE = Path(__file__).resolve().parent
FAMILIES = ("xcopa", "mgsm")  # benchmarks with a config here: task names are <family>_<lang>


_LANG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")  # a file name and a function name part


def split_task(name: str) -> tuple[str, str] | None:
    """``xcopa_sw`` -> ("xcopa", "sw"); None for a task that is not one of ours."""
    family, sep, lang = name.partition("_")
    return (family, lang) if sep and family in FAMILIES and _LANG.match(lang) else None


def _xcopa_row(doc: dict[str, Any], lang: str) -> XcopaRow:
    return XcopaRow(lang, doc["premise"], doc["choice1"], doc["choice2"], doc["question"],
                    int(doc["label"]), int(doc.get("idx") or 0))  # fmt: skip


def xcopa_functions(lang: str) -> tuple[Callable[[dict], str], Callable[[dict], list[str]]]:
    """doc_to_text and doc_to_choice of ``xcopa_<lang>``: our own request for the row."""

    def text(doc: dict[str, Any]) -> str:
        return xcopa_request(_xcopa_row(doc, lang))[0]

    def choices(doc: dict[str, Any]) -> list[str]:
        return list(xcopa_request(_xcopa_row(doc, lang))[1])

    return text, choices


def __getattr__(name: str) -> Callable[[dict], Any]:
    """``xcopa_text_<lang>`` / ``xcopa_choices_<lang>`` for any language: what a generated task's
    ``!function`` names (a row need not carry its language; the file name gives it)."""
    for kind, pick in (("xcopa_text_", 0), ("xcopa_choices_", 1)):
        if name.startswith(kind) and len(name) > len(kind):
            return xcopa_functions(name[len(kind) :])[pick]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def mgsm_text(doc: dict[str, Any]) -> str:
    return mgsm_prompt(doc["question"], DEFAULT_MGSM_TEMPLATE)


def mgsm_results(doc: dict[str, Any], results: Sequence[str]) -> dict[str, float]:
    """Our MGSM metric: the answer's last number equals the gold number."""
    return {"acc": float(numbers_match(extract_number(results[0]), parse_gold(doc["answer"])))}


def _q(value: Any) -> str:
    return json.dumps(str(value), ensure_ascii=False)  # a JSON string is a YAML string


def task_yaml(family: str, lang: str, data_file: Path, cache_dir: Path, max_new_tokens: int) -> str:
    """The text of one generated task (``!function`` tags: not expressible with yaml.dump)."""
    lines = [
        f"include: {_q(HERE / f'{family}.yaml')}",
        f"task: {_q(f'{family}_{lang}')}",
        "dataset_kwargs:",
        f"  data_files: {{test: {_q(data_file)}}}",
        f"  cache_dir: {_q(cache_dir)}",
    ]
    if family == "xcopa":
        lines += [f"doc_to_text: !function eval.lm_eval_tasks.xcopa_text_{lang}",
                  f"doc_to_choice: !function eval.lm_eval_tasks.xcopa_choices_{lang}"]  # fmt: skip
    else:
        lines += ["generation_kwargs:", "  until: []", "  do_sample: false",
                  f"  max_gen_toks: {int(max_new_tokens)}"]  # fmt: skip
    return "\n".join(lines) + "\n"


def write_tasks(
    tasks: Sequence[str],
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    max_new_tokens: int = 256,
) -> dict[str, Path]:
    """Write a task file for each of ``tasks`` that is ours (``xcopa_sw``, ``mgsm_sw``) into
    ``out_dir`` (lm-eval's ``include_path``); returns task name -> file. A missing benchmark
    file raises ``MissingBenchmark`` naming the languages that exist."""
    out = Path(out_dir)
    written: dict[str, Path] = {}
    for name in tasks:
        parts = split_task(name)
        if parts is None:
            continue
        family, lang = parts
        data_file = benchmark_file(data_dir, family, lang).resolve()
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{name}.yaml"
        path.write_text(task_yaml(family, lang, data_file, out / "datasets_cache", max_new_tokens))
        written[name] = path
    return written
