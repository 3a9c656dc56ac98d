"""Results -> markdown table, bar chart, MLflow (through the project's ``Tracker``)."""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from eval.tasks import TaskResult

COLUMN_TITLES = {
    "xcopa": "XCOPA acc",
    "mgsm": "MGSM acc",
    "bitext": "bitext acc (best layer)",
    "ppl": "perplexity (bits/byte)",  # the cell holds both: "12.3 (3.10 bpb)"
}
# A chart draws only the headline value: its title names that value alone.
CHART_TITLES = {**COLUMN_TITLES, "ppl": "perplexity (per token)"}


def _cell(result: TaskResult, lang: str) -> str:
    value = result.per_language.get(lang)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if result.task == "ppl":
        bpb = result.details.get(lang, {}).get("bits_per_byte")
        return f"{value:.2f}" + (f" ({bpb:.2f} bpb)" if bpb is not None else "")
    text = f"{value:.3f}"
    if result.task == "bitext":
        text += f" (L{result.details[lang]['best_layer']})"
    elif "total" in result.counts.get(lang, {}):
        text += f" (n={int(result.counts[lang]['total'])})"
    return text


def markdown_table(results: Mapping[str, TaskResult]) -> str:
    """One row per language, one column per task; "-" where a task has no data for a language."""
    languages = sorted({lang for r in results.values() for lang in r.per_language})
    tasks = list(results)
    header = "| lang | " + " | ".join(COLUMN_TITLES.get(t, t) for t in tasks) + " |"
    rule = "|---|" + "---|" * len(tasks)
    lines = [header, rule]
    for lang in languages:
        cells = [_cell(results[t], lang) for t in tasks]
        lines.append(f"| {lang} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def flat_metrics(results: Mapping[str, TaskResult], prefix: str = "eval") -> dict[str, float]:
    """``eval/<task>/<metric>/<lang>`` for every headline number (plus ppl's bits per byte).

    The language comes last because MLflow's run page makes one chart section of everything
    before a key's last ``/`` and titles each chart with the rest: one section per task and
    metric, one chart per language (``<lang>/<metric>`` gave a section per language).
    """
    out = {
        f"{prefix}/{r.task}/{r.metric}/{lang}": value
        for r in results.values()
        for lang, value in r.per_language.items()
    }
    if "ppl" in results:
        for lang, extra in results["ppl"].details.items():
            out[f"{prefix}/ppl/bits_per_byte/{lang}"] = extra["bits_per_byte"]
    return out


def layer_metrics(
    results: Mapping[str, TaskResult], prefix: str = "eval"
) -> dict[int, dict[str, float]]:
    """Per-layer bitext accuracy, keyed by layer (logged with step = layer, so MLflow's x axis
    is the layer): ``eval/bitext_by_layer/<lang>_x2en`` and ``..._en2x``, one section."""
    by_layer: dict[int, dict[str, float]] = {}
    if "bitext" in results:
        for lang, curves in results["bitext"].details.items():
            for layer, (a, b) in enumerate(zip(curves["x2en"], curves["en2x"], strict=True)):
                row = by_layer.setdefault(layer, {})
                row[f"{prefix}/bitext_by_layer/{lang}_x2en"] = a
                row[f"{prefix}/bitext_by_layer/{lang}_en2x"] = b
    return by_layer


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (no display on a cluster node)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path) -> Path:
    """Lay out, write (creating the folder) and close a chart; returns its path."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    pyplot().close(fig)
    return path


def bar_chart(results: Mapping[str, TaskResult], path: str | Path) -> Path:
    """One panel per task, one bar per language (Agg backend: no display needed)."""
    plt = pyplot()

    tasks = list(results)
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(4 * max(1, len(tasks)), 3.2))
    axes = [axes] if len(tasks) <= 1 else list(axes)
    for ax, task in zip(axes, tasks, strict=False):
        result = results[task]
        langs = sorted(result.per_language)
        values = [result.per_language[lang] for lang in langs]
        ax.bar(langs, [0.0 if math.isnan(v) else v for v in values], color="tab:blue")
        ax.set_title(CHART_TITLES.get(task, task))
        if result.metric == "acc":
            ax.set_ylim(0, 1)
        for x, v in enumerate(values):
            ax.text(x, 0 if math.isnan(v) else v, "-" if math.isnan(v) else f"{v:.2f}",
                    ha="center", va="bottom", fontsize=8)  # fmt: skip
    return save_figure(fig, path)


def bitext_chart(result: TaskResult, path: str | Path) -> Path:
    """Retrieval accuracy per layer, both directions, one line pair per language."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for lang in sorted(result.details):
        curves = result.details[lang]
        (line,) = ax.plot(curves["x2en"], label=f"{lang}→en")
        ax.plot(curves["en2x"], linestyle="--", color=line.get_color(), label=f"en→{lang}")
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel("retrieval accuracy")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def results_dict(results: Mapping[str, TaskResult], **extra: Any) -> dict[str, Any]:
    return {**extra, "tasks": {name: r.to_dict() for name, r in results.items()}}


def log_results(
    results: Mapping[str, TaskResult],
    tracker: Any,
    *,
    step: int = 0,
    out_dir: str | Path | None = None,
    prefix: str = "eval",
) -> list[Path]:
    """Metrics, the table, the JSON and the charts to the tracker; returns the chart files.

    Bitext curves are also logged as metrics with the layer as the step (`layer_metrics`), so
    MLflow draws them against the layer.
    Charts go to ``out_dir`` (kept) or a temporary folder (only in MLflow).
    """
    folder = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="polyshift-eval-"))
    folder.mkdir(parents=True, exist_ok=True)
    charts = [bar_chart(results, folder / "eval_results.png")]
    if "bitext" in results:
        charts.append(bitext_chart(results["bitext"], folder / "bitext_layers.png"))
    if tracker is None:
        return charts
    tracker.log_metrics(flat_metrics(results, prefix), step=step)
    by_layer = layer_metrics(results, prefix)
    if hasattr(tracker, "log_layer_metrics"):  # launcher.tracking.Tracker: held past log_model
        tracker.log_layer_metrics(by_layer)
    else:
        for layer, row in by_layer.items():
            tracker.log_metrics(row, step=layer)
    tracker.log_text(markdown_table(results), f"{prefix}/results.md")
    tracker.log_dict(json.loads(json.dumps(results_dict(results))), f"{prefix}/results.json")
    for chart in charts:
        tracker.log_artifact(chart, prefix)
    return charts
