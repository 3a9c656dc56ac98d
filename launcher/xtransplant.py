"""XTransplant: cross-lingual transplant of one layer's feed-forward (or attention) output.

The command line of the offline pair search; the pieces it runs, bottom to top:
``methods/xtransplant.py`` (the method: recording and transplant hooks),
``launcher/xtransplant_config.py`` (settings, benchmark instances),
``launcher/xtransplant_worker.py`` (one model scoring units, batched over source layers),
``launcher/xtransplant_search.py`` (the search over (i, j), in-process or on Ray actors).

Directions: ``en2x`` (aux = pivot language, main = target language: multilingual tasks) and
``x2en`` (aux = target language, main = pivot: culture tasks). Scores are always against the
main prompt's gold answer.

CLI: ``python -m launcher.xtransplant --model DIR --task mgsm --languages sw --dev 20 --test 20 --ray``
or ``--config recipes/xtransplant/xtransplant_smollm2.yaml`` (flags override the file).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from config.cli import bounded_int, run_cli
from config.errors import UserError
from eval.report import pyplot, save_figure
from launcher.xtransplant_config import XTransplantConfig, build_instances
from launcher.xtransplant_search import LanguageResult, search
from methods.xtransplant import SITES


def heatmap(result: LanguageResult, path: str | Path, title: str = "") -> Path:
    """Accuracy per (source, target) pair: dev (and test) panels, the chosen pair starred."""
    plt = pyplot()

    panels = [("dev", result.dev_grid)] + ([("test", result.test_grid)] if result.test_grid else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    i, j = result.best_pair
    for ax, (name, grid) in zip(axes[0], panels, strict=True):
        image = ax.imshow(grid, origin="lower", aspect="auto", vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(result.targets)), [str(t) for t in result.targets], fontsize=6)
        ax.set_yticks(range(len(result.sources)), [str(s) for s in result.sources], fontsize=6)
        ax.set_xlabel("target layer j (main prompt)")
        ax.set_ylabel("source layer i (aux prompt)")
        baseline = result.dev_baseline if name == "dev" else result.test_baseline
        ax.set_title(f"{title}{result.lang} {name} (no transplant {baseline:.2f})", fontsize=8)
        ax.plot(result.targets.index(j), result.sources.index(i), marker="*", color="red", ms=12)
        fig.colorbar(image, ax=ax, fraction=0.046)
    return save_figure(fig, path)


def summary_table(results: Mapping[str, LanguageResult]) -> str:
    lines = [
        "| lang | best (i, j) | dev best | dev base | test best | test base | test upper bound |",
        "|---|---|---|---|---|---|---|",
    ]
    for lang, r in results.items():
        ub = "-" if r.test_upper_bound is None else f"{r.test_upper_bound:.3f}"
        lines.append(
            f"| {lang} | ({r.best_pair[0]}, {r.best_pair[1]}) | {r.dev_best:.3f} | "
            f"{r.dev_baseline:.3f} | {r.test_best:.3f} | {r.test_baseline:.3f} | {ub} |"
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m launcher.xtransplant", description=__doc__.split("\n")[0]
    )
    d = XTransplantConfig()  # the defaults named in the help texts
    p.add_argument("--config", help="YAML with XTransplantConfig keys (flags override it)")
    p.add_argument("--model", help="HF directory, export, .gguf or embedded:NAME to search on")
    p.add_argument(
        "--task",
        choices=("xcopa", "mgsm"),
        help=f"benchmark whose items are scored (default {d.task})",
    )
    p.add_argument(
        "--data-dir",
        dest="data_dir",
        help="shared data folder (default: $POLYSHIFT_SHARED_DATA, else ../shared/data)",
    )
    p.add_argument(
        "--languages", help=f"comma-separated target languages (default {','.join(d.languages)})"
    )
    p.add_argument("--pivot", help=f"the pivot language of the pairs (default {d.pivot})")
    p.add_argument(
        "--direction",
        choices=("en2x", "x2en"),
        help="en2x: aux prompt in the pivot, main in the target; x2en: the reverse "
        f"(default {d.direction})",
    )
    p.add_argument(
        "--site",
        choices=SITES,
        help=f"whose output is transplanted: the layer's {' or '.join(SITES)} (default {d.site})",
    )
    p.add_argument(
        "--dev",
        type=int,  # XTransplantConfig checks the range (a config file gives it too)
        help=f"items per language that choose the pair (default {d.dev})",
    )
    p.add_argument(
        "--test",
        type=int,
        help=f"held-out items per language scored with the chosen pair (default {d.test})",
    )
    p.add_argument(
        "--source-layers",
        dest="source_layers",
        help='layers i of the aux prompt: "all" (default), "0-29:3", "4,8,12"',
    )
    p.add_argument(
        "--target-layers",
        dest="target_layers",
        help="layers j of the main prompt, as --source-layers (default all)",
    )
    p.add_argument(
        "--max-new-tokens",
        dest="max_new_tokens",
        type=bounded_int(1, 2**20),
        help=f"mgsm: greedy tokens per answer (default {d.max_new_tokens})",
    )
    p.add_argument(
        "--ray",
        action="store_const",
        const=True,
        default=None,
        help="score on Ray actors (default: in this process)",
    )
    p.add_argument(
        "--ray-address",
        dest="ray_address",
        help="Ray cluster to join (default: a local Ray instance)",
    )
    p.add_argument(
        "--workers", type=bounded_int(1, 1024), help=f"--ray: model actors (default {d.workers})"
    )
    p.add_argument(
        "--no-upper-bound",
        dest="upper_bound",
        action="store_const",
        const=False,
        default=None,
        help="skip the test-set oracle (best pair per item)",
    )
    p.add_argument("--out", help=f"folder for xtransplant.json and heatmaps (default {d.out})")
    p.add_argument("--tracking-uri", dest="tracking_uri", help="log to this MLflow store/server")
    p.add_argument(
        "--track",
        action="store_const",
        const=True,
        default=None,
        help="log to MLflow (default store ./mlflow.db)",
    )
    return p  # fmt: skip


def config_from_args(argv: Sequence[str] | None = None) -> XTransplantConfig:
    args = vars(_parser().parse_args(argv))
    values: dict[str, Any] = {}
    config_path = args.pop("config")
    if config_path:
        from config.recipe import load_yaml_file

        loaded = load_yaml_file(config_path, "config") or {}
        if not isinstance(loaded, dict):
            raise UserError(f"{config_path}: expected a mapping of XTransplantConfig keys")
        values.update(loaded)
    values.update({k: v for k, v in args.items() if v is not None})
    return XTransplantConfig.from_mapping(values, source=config_path or "arguments")


@run_cli
def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = config_from_args(argv)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from config.schema import ModelSection
    from eval.benchmarks import BenchmarkError
    from launcher.preflight import check_backbone

    if not config.model:
        raise UserError("model: give --model (or model: in --config)")
    check_backbone(ModelSection(backbone=config.model), "model")  # before the search loads it

    try:
        instances = {lang: build_instances(config, lang) for lang in config.languages}
    except (BenchmarkError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    began = time.perf_counter()
    results = search(config, instances)
    seconds = time.perf_counter() - began
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    charts = [heatmap(r, out / f"heatmap_{config.task}_{lang}.png") for lang, r in results.items()]
    payload = {"config": asdict(config), "seconds": seconds,
               "languages": {lang: r.to_dict() for lang, r in results.items()}}  # fmt: skip
    (out / "xtransplant.json").write_text(json.dumps(payload, indent=2, ensure_ascii=False))
    table = summary_table(results)
    print(table)
    print(f"wrote {out / 'xtransplant.json'} and {len(charts)} heatmap(s) in {seconds:.1f} s")
    if config.track or config.tracking_uri:
        from launcher.tracking import Tracker

        with Tracker(enabled=True, is_rank0=True, tracking_uri=config.tracking_uri,
                     experiment=config.experiment, run_name=f"xtransplant-{config.task}",
                     log_system_metrics=False) as tracker:  # fmt: skip
            tracker.start(params={"xtransplant": asdict(config)})
            for lang, r in results.items():
                tracker.log_metrics(
                    {f"xtransplant/{lang}/dev_best": r.dev_best,
                     f"xtransplant/{lang}/test_best": r.test_best,
                     f"xtransplant/{lang}/test_baseline": r.test_baseline,
                     f"xtransplant/{lang}/test_upper_bound": r.test_upper_bound or math.nan,
                     f"xtransplant/{lang}/best_source": r.best_pair[0],
                     f"xtransplant/{lang}/best_target": r.best_pair[1]},
                    step=0,
                )  # fmt: skip
            tracker.log_text(table, "xtransplant/summary.md")
            tracker.log_dict(payload, "xtransplant/xtransplant.json")
            for chart in charts:
                tracker.log_artifact(chart, "xtransplant")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
