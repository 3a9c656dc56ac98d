"""Metric names and chart titles of eval.report, as MLflow's run page will group and draw them."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from eval.report import CHART_TITLES, flat_metrics, layer_metrics, log_results
from eval.tasks import TaskResult


def _results() -> dict[str, TaskResult]:
    bitext = {
        "sw": {"x2en": [0.1, 0.5, 0.4], "en2x": [0.2, 0.3, 0.6], "best_layer": 1},
        "fr": {"x2en": [0.0, 0.25, 1.0], "en2x": [0.5, 0.5, 0.75], "best_layer": 2},
    }
    return {
        "xcopa": TaskResult("xcopa", "acc", {"sw": 0.5, "zh": 0.75}),
        "ppl": TaskResult("ppl", "ppl", {"sw": 12.0}, details={"sw": {"bits_per_byte": 3.5}}),
        "bitext": TaskResult("bitext", "acc", {"sw": 0.5, "fr": 1.0}, details=bitext),
    }


def _section(key: str) -> str:
    # What MLflow's run page does (mlflow 3.17 UI, extractChartSectionName): everything before
    # the last "/" is the section, the rest is the chart's title.
    return key.rsplit("/", 1)[0]


def test_one_section_per_task_and_metric_one_chart_per_language() -> None:
    flat = flat_metrics(_results())
    assert flat == {
        "eval/xcopa/acc/sw": 0.5,
        "eval/xcopa/acc/zh": 0.75,
        "eval/ppl/ppl/sw": 12.0,
        "eval/ppl/bits_per_byte/sw": 3.5,
        "eval/bitext/acc/sw": 0.5,
        "eval/bitext/acc/fr": 1.0,
    }
    sections = {_section(k) for k in flat}
    assert sections == {
        "eval/xcopa/acc",
        "eval/ppl/ppl",
        "eval/ppl/bits_per_byte",
        "eval/bitext/acc",
    }


def test_bitext_curves_are_keyed_by_layer_in_one_section() -> None:
    by_layer = layer_metrics(_results())
    assert sorted(by_layer) == [0, 1, 2]
    assert by_layer[2] == {
        "eval/bitext_by_layer/sw_x2en": 0.4,
        "eval/bitext_by_layer/sw_en2x": 0.6,
        "eval/bitext_by_layer/fr_x2en": 1.0,
        "eval/bitext_by_layer/fr_en2x": 0.75,
    }
    assert {_section(k) for row in by_layer.values() for k in row} == {"eval/bitext_by_layer"}
    assert layer_metrics({"xcopa": _results()["xcopa"]}) == {}


def test_perplexity_chart_is_not_titled_bits_per_byte() -> None:
    assert "bits" not in CHART_TITLES["ppl"] and "perplexity" in CHART_TITLES["ppl"]


class _Recorder:
    def __init__(self) -> None:
        self.metrics: list[tuple[str, float, int]] = []

    def log_metrics(self, metrics, step: int) -> None:
        self.metrics += [(k, v, step) for k, v in metrics.items()]

    def log_text(self, text: str, name: str) -> None:
        pass

    def log_dict(self, obj, name: str) -> None:
        pass

    def log_artifact(self, path, artifact_path=None) -> None:
        pass


def test_log_results_logs_layers_as_steps(tmp_path: Path) -> None:
    tracker = _Recorder()
    log_results(_results(), tracker, step=7, out_dir=tmp_path)
    steps = {k: [] for k, _, _ in tracker.metrics}
    for key, value, step in tracker.metrics:
        steps[key].append((step, value))
    assert steps["eval/xcopa/acc/sw"] == [(7, 0.5)]
    assert steps["eval/bitext_by_layer/fr_x2en"] == [(0, 0.0), (1, 0.25), (2, 1.0)]
    assert all(not math.isnan(v) for _, v, _ in tracker.metrics)


@pytest.mark.slow
def test_layer_curves_reach_mlflow_with_the_layer_as_step(tmp_path: Path, monkeypatch) -> None:
    from mlflow import MlflowClient

    from launcher.tracking import Tracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = Tracker(enabled=True, is_rank0=True, tracking_uri=None, experiment="report",
                      run_name="t", log_system_metrics=False, workdir=tmp_path)  # fmt: skip
    with tracker:
        run_id = tracker.start()
        log_results(_results(), tracker, step=3, out_dir=tmp_path / "charts")
    client = MlflowClient(tracker.tracking_uri)
    history = client.get_metric_history(run_id, "eval/bitext_by_layer/sw_en2x")
    assert [(m.step, m.value) for m in history] == [(0, 0.2), (1, 0.3), (2, 0.6)]
    assert [m.step for m in client.get_metric_history(run_id, "eval/ppl/bits_per_byte/sw")] == [3]
