"""CLI for exported ShifCon models: `python -m launcher.shifcon_infer generate|detect-eval EXPORT ...`."""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Sequence

from methods.shifcon.infer import ShiftedLM, detection_accuracy


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.shifcon_infer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="answer prompts with the shift on")
    gen.add_argument("export")
    gen.add_argument("--prompt", action="append", required=True)
    gen.add_argument("--lang", default="auto", help="language code, 'auto', or 'none' (no shift)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    det = sub.add_parser("detect-eval", help="language-detection accuracy per language")
    det.add_argument("export")
    det.add_argument("--data", required=True, help="rows with lang + instruction (any source)")
    det.add_argument("--limit-per-language", type=int, default=50)
    args = parser.parse_args(argv)

    lm = ShiftedLM.from_export(args.export)
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
    from data.sources import load_rows

    rows, _ = load_rows(args.data)
    per_lang: Counter[str] = Counter()
    kept = []
    for row in rows:
        if per_lang[row["lang"]] < args.limit_per_language:
            per_lang[row["lang"]] += 1
            kept.append(row)
    accuracy = detection_accuracy(lm, kept)
    print("| language | detection accuracy | prompts |\n|---|---|---|")
    for lang, acc in accuracy.items():
        print(f"| {lang} | {acc:.3f} | {per_lang[lang]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
