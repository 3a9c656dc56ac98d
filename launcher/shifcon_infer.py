"""CLI for exported ShifCon models: `python -m launcher.shifcon_infer generate|detect-eval EXPORT ...`.

detect-eval --model EXPORT [--data-dir ../shared/data | --data SOURCE]
    accuracy of every language detector (centroid, linear, langid) per language, on the
    shared MGSM questions and the held-out parallel questions (`data/gsm8k_shared.py`).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from config.cli import bounded_int, run_cli
from config.errors import UserError
from config.schema import ModelSection
from methods.shifcon.detect import DETECTORS
from methods.shifcon.infer import ShiftedLM, detection_accuracies


@run_cli
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.shifcon_infer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="answer prompts with the shift on")
    gen.add_argument("export", help="the export directory of a ShifCon run (holds shifcon.json)")
    gen.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    gen.add_argument("--lang", default="auto", help="language code, 'auto', or 'none' (no shift)")
    gen.add_argument("--max-new-tokens", type=bounded_int(1, 2**20), default=64,
                     help="greedy tokens per answer (default 64)")  # fmt: skip
    det = sub.add_parser(
        "detect-eval", help="language-detection accuracy per language, every detector"
    )
    det.add_argument("export", nargs="?", help="the export directory (or --model)")
    det.add_argument("--model", help="the export directory")
    det.add_argument("--data", help="rows with lang + instruction (any source)")
    det.add_argument(
        "--data-dir",
        help="shared data folder: its MGSM questions and held-out parallel questions "
        "(default with neither --data nor --data-dir: $POLYSHIFT_SHARED_DATA, else ../shared/data)",
    )
    det.add_argument(
        "--detectors",
        default=",".join(DETECTORS),
        help=f"comma-separated detectors (default: all of {', '.join(DETECTORS)})",
    )
    det.add_argument("--limit-per-language", type=bounded_int(1, 10**7), default=50,
                     help="prompts per language and source (default 50)")  # fmt: skip
    args = parser.parse_args(argv)

    export = getattr(args, "model", None) or args.export
    if not export:
        raise UserError("give the export directory (EXPORT or --model)")
    from launcher.preflight import check_backbone

    check_backbone(ModelSection(backbone=str(export)), "export")  # config, weights, tokenizer
    if not (Path(export) / "shifcon.json").is_file():
        raise UserError(
            f"export: {export} is not a ShifCon export (no shifcon.json; a plain export runs "
            "with python -m launcher.evaluate)"
        )
    if args.command == "detect-eval":
        return detect_eval(args, export)
    lm = ShiftedLM.from_export(export)
    if args.command == "generate":
        langs = None if args.lang == "none" else args.lang
        if langs == "auto":
            langs = lm.detect(args.prompt)
        for prompt, answer, lang in zip(
            args.prompt,
            lm.generate(args.prompt, langs, max_new_tokens=args.max_new_tokens),
            langs if isinstance(langs, list) else [langs] * len(args.prompt),
            strict=True,
        ):
            print(f"[{lang or 'no shift'}] {prompt}\n  -> {answer.strip()}")
        return 0
    return 0


def detect_eval(args, export: str) -> int:
    """Every detector side by side, per language and per prompt source."""
    detectors = [d.strip() for d in args.detectors.split(",") if d.strip()]
    bad = [d for d in detectors if d not in DETECTORS]
    if bad:
        raise UserError(f"--detectors: unknown {bad}; known: {', '.join(DETECTORS)}")
    lm = ShiftedLM.from_export(export)
    if "linear" in detectors and lm.detector is None:
        print("note: the export has no linear detector; skipping it")
        detectors.remove("linear")
    sources = detection_sources(args, lm.languages)
    table = {}
    for name, rows in sources.items():
        for det, accs in detection_accuracies(lm, rows, detectors).items():
            table[(name, det)] = accs
    print(format_detection_table(table, sources, detectors, lm.languages))
    return 0


def detection_sources(args, languages: list[str]) -> dict[str, list[dict]]:
    """{source name: rows with lang + instruction}, at most --limit-per-language per language."""
    limit = args.limit_per_language
    if args.data:
        from data.sources import load_rows

        rows, _ = load_rows(args.data)
        return {"data": _cap([r for r in rows if r["lang"] in languages], limit)}
    from data.gsm8k_shared import load_items
    from eval.benchmarks import load_mgsm, shared_data_dir

    data_dir = shared_data_dir(args.data_dir)
    mgsm = []
    for lang in languages:
        path = data_dir / "mgsm" / f"{lang}.jsonl"
        if path.is_file():
            mgsm += [{"lang": lang, "instruction": r.question} for r in load_mgsm(path)]
    items = load_items(data_dir, languages, split="heldout")
    parallel = [
        {"lang": lang, "instruction": item.en if lang == "en" else item.questions[lang]}
        for item in items
        for lang in languages
    ]
    return {"mgsm": _cap(mgsm, limit), "parallel held-out": _cap(parallel, limit)}


def _cap(rows: list[dict], limit: int) -> list[dict]:
    seen: Counter[str] = Counter()
    kept = []
    for row in rows:
        if seen[row["lang"]] < limit:
            seen[row["lang"]] += 1
            kept.append(row)
    return kept


def format_detection_table(table, sources, detectors, languages) -> str:
    """Markdown: one row per (source, language), one column per detector, plus the minimum."""
    head = "| source | language | prompts | " + " | ".join(detectors) + " |"
    lines = [head, "|" + "---|" * (3 + len(detectors))]
    for name, rows in sources.items():
        counts = Counter(r["lang"] for r in rows)
        for lang in languages:
            if counts[lang]:
                accs = [f"{table[(name, d)].get(lang, float('nan')):.3f}" for d in detectors]
                lines.append(f"| {name} | {lang} | {counts[lang]} | " + " | ".join(accs) + " |")
        worst = [f"{min(table[(name, d)].values()):.3f}" for d in detectors]
        lines.append(f"| {name} | **min** | {len(rows)} | " + " | ".join(worst) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
