"""CLI of the layer probe: `python -m launcher.probe --model M --pairs P --languages en,fr --out DIR`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from config.cli import bounded_int, run_cli
from config.errors import UserError
from methods.shifcon.probe import ProbeInputs, build_inputs, log_probe, run_probe


def write_band_into(recipe_path: Path, band: tuple[int, int]) -> None:
    """Set ``method.band`` in a recipe YAML (a YAML round trip: comments are not kept)."""
    import yaml

    from config.recipe import load_yaml_file

    path = Path(recipe_path)
    tree = load_yaml_file(path, "recipe") or {}
    if not isinstance(tree, dict):
        raise UserError(f"{path}: a recipe is a mapping of sections")
    method = tree.get("method")
    if isinstance(method, str):
        method = {"name": method}
    if not isinstance(method, dict) or method.get("name") != "shifcon":
        raise UserError(f"{path}: method is not shifcon; nothing to write the band into")
    method["band"] = [int(band[0]), int(band[1])]
    tree["method"] = method
    path.write_text(yaml.safe_dump(tree, sort_keys=False, allow_unicode=True), encoding="utf-8")


# -- CLI ------------------------------------------------------------------------------------


def _cli_inputs(args, tokenizer, languages: list[str]) -> ProbeInputs:
    from data.formatting import encode_rows
    from data.pairs import load_pairs
    from data.sources import load_rows

    pairs = (
        load_pairs(args.pairs, train_rows=[], dominant=languages[0], languages=languages)
        if args.pairs
        else []
    )

    from methods.shifcon.method import sentence_example

    def tok(text: str):
        return sentence_example(tokenizer, text, args.max_length)

    pair_ids = []
    for p in pairs:
        en, x = tok(p.en), tok(p.target)
        pair_ids.append((p.lang, en.input_ids, x.input_ids, en.span, x.span))
    if args.data:
        rows, _ = load_rows(args.data)
        examples, _ = encode_rows(tokenizer, rows, languages, max_length=args.max_length)
        samples = [(ex.lang, ex.input_ids, ex.span) for ex in examples]
    else:  # the pairs' own sentences: English once per pair item, targets per language
        samples, seen = [], set()
        for lang, en, target, en_span, target_span in pair_ids:
            if tuple(en) not in seen:
                seen.add(tuple(en))
                samples.append((languages[0], en, en_span))
            samples.append((lang, target, target_span))
    if not samples:
        raise UserError("give --data or --pairs (no probe samples)")
    return build_inputs(languages, samples, pair_ids, args.samples)


@run_cli
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.probe", description=__doc__)
    parser.add_argument("--model", help="backbone (as model.backbone) or an export directory")
    parser.add_argument("--recipe", help="recipe: its model and tracking sections are used")
    parser.add_argument("--data", help="instruction rows (lang, instruction, response)")
    parser.add_argument("--pairs", help="parallel {lang, en, target} rows (JSONL file/folder)")
    parser.add_argument("--languages", required=True, help="comma list, dominant first")
    parser.add_argument(
        "--samples",
        type=bounded_int(1, 10**7),
        default=64,
        help="samples (and pairs) per language (default 64)",
    )
    parser.add_argument("--out", required=True, help="directory for probe.json and probe.png")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.1,
        help="relative tolerance over the minimum mean distance (default 0.1)",
    )
    parser.add_argument(
        "--batch-size",
        type=bounded_int(1, 2**16),
        default=8,
        help="samples per forward (default 8)",
    )
    parser.add_argument("--max-length", type=bounded_int(1, 2**20), default=128,
                        help="tokens per sample; longer ones are cut (default 128)")  # fmt: skip
    parser.add_argument("--tracking-uri", help="MLflow store/server (default: the recipe's)")
    parser.add_argument("--write-band-into", help="recipe YAML whose method.band is set")
    args = parser.parse_args(argv)

    from config.schema import ModelSection, TrackingSection
    from launcher.tracking import Tracker
    from model.backbone import load_causal_lm, load_tokenizer, resolve_backbone
    from parallel.distributed import init_distributed, resolve_device

    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    recipe = None
    if args.recipe:
        from config.recipe import load_recipe

        recipe = load_recipe(args.recipe)
    model_section = recipe.model.model_copy() if recipe else ModelSection()
    if args.model:
        model_section = model_section.model_copy(update={"backbone": args.model})
    elif recipe is None:
        parser.error("--model or --recipe is required")
    languages = [x.strip() for x in args.languages.split(",") if x.strip()]
    if len(languages) < 2:
        parser.error("--languages needs the dominant language and at least one other")

    from launcher.preflight import check_backbone

    check_backbone(model_section, "--model" if args.model else "model.backbone")
    if not 0 <= args.tolerance < float("inf"):
        raise UserError(f"--tolerance: a finite number >= 0, got {args.tolerance}")
    ctx = init_distributed(resolve_device("auto"))
    backbone = resolve_backbone(model_section)
    tokenizer = load_tokenizer(backbone, model_section)
    model = load_causal_lm(backbone, model_section, torch.float32).to(ctx.torch_device)
    inputs = _cli_inputs(args, tokenizer, languages)
    result = run_probe(model, inputs, batch_size=args.batch_size, tolerance=args.tolerance)
    if not ctx.is_rank0:
        return 0
    files = result.save(Path(args.out))
    print(f"band: {list(result.band)}  ({files[0]}, {files[1]})")
    for layer, d, lid, bt in zip(
        result.layers,
        result.mean_distance,
        result.language_id_accuracy,
        result.bitext_retrieval_accuracy,
        strict=True,
    ):
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        print(f"  layer {layer:3d}  distance {d:.4f}  lang-id {fmt(lid)}  bitext {fmt(bt)}")
    tracking = recipe.tracking if recipe else TrackingSection()
    if args.tracking_uri or recipe is not None:
        tracker = Tracker(
            enabled=tracking.enabled,
            is_rank0=True,
            tracking_uri=args.tracking_uri or tracking.tracking_uri,
            experiment=tracking.experiment,
            run_name=f"probe-{Path(str(model_section.backbone)).name}",
            log_system_metrics=False,
            workdir=Path.cwd(),
        )
        with tracker:
            tracker.start(
                params={
                    "probe.model": model_section.backbone,
                    "probe.languages": ",".join(languages),
                    "probe.samples": args.samples,
                    "probe.tolerance": args.tolerance,
                }
            )
            log_probe(tracker, result, files)
    if args.write_band_into:
        write_band_into(Path(args.write_band_into), result.band)
        print(f"wrote method.band {list(result.band)} into {args.write_band_into}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
