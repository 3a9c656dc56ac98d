"""Layer probe: 2 ranks == 1 rank, `band: auto` ShifCon runs and logs its band, the probe CLI."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from config.recipe import RecipeError, load_recipe, validate_recipe
from config.schema import ShifConMethod
from data.pairs import pairs_from_rows
from launcher.probe import main as probe_main
from launcher.probe import write_band_into
from launcher.run import preflight
from methods.shifcon.method import ShifCon, load_shifcon
from methods.shifcon.probe import PLOT_FILE, PROBE_FILE, log_probe
from tests.helpers.runs import run_data, summary, train

torch.set_num_threads(1)
AUTO = {"name": "shifcon", "band": "auto", "mcl_batch_size": 4, "vector_samples": 8}
AUTO["probe_samples"] = 6


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return tiny_model_dir, tokenizer, run_data(tokenizer)


@pytest.mark.slow
def test_band_auto_two_ranks_equals_one_rank_and_is_logged(tmp_path, tiny):
    """A 2-worker ZeRO-3 ShifCon run with band: auto picks the same band and curves as the
    probe computed in this process on the plain model, logs the band, and trains."""
    path, tokenizer, data = tiny
    proc, run = train(
        tmp_path,
        path,
        "auto_dp2",
        f"method={json.dumps(AUTO)}",
        "cluster.workers_per_node=2",
        "training.steps=2",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "shifcon: band auto -> [2, 3]" in proc.stdout
    assert summary(run)["steps"] == 2
    meta, _ = load_shifcon(run / "export")
    assert meta["band"] == [2, 3] and meta["layers"] == [2, 3]
    got = json.loads((run / "export" / PROBE_FILE).read_text())
    assert (run / "export" / PLOT_FILE).stat().st_size > 1000
    assert "our own" in got["definition"].lower()

    method = ShifCon(
        ShifConMethod(**AUTO),
        languages=data.languages,
        tokenizer=tokenizer,
        train_rows=data.train_rows,
        seed=0,
    )
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    method.attach(model)
    method.prepare(model, data.train, batch_size=4)  # eval_batch_size of the tiny recipe
    ref = method.probe_result.to_json()
    assert got["band"] == ref["band"] == [2, 3]
    assert got["layers"] == [1, 2, 3, 4]
    assert (
        got["samples_per_language"]
        == ref["samples_per_language"]
        == dict.fromkeys(data.languages, 6)
    )
    for lang in data.languages:
        assert got["distances"][lang] == pytest.approx(ref["distances"][lang], rel=1e-5, abs=1e-7)
    assert got["mean_distance"] == pytest.approx(ref["mean_distance"], rel=1e-5)
    assert got["language_id_accuracy"] == ref["language_id_accuracy"]
    assert got["bitext_retrieval_accuracy"] == ref["bitext_retrieval_accuracy"]

    # What the loop logs to MLflow (param and tag `shifcon.band`) once prepared.
    assert method.run_tags() == {"shifcon.band": "2,3"}
    logged = FakeTracker()
    log_probe(logged, method.probe_result)
    assert logged.params == {"shifcon.band": "2,3"} and logged.tags == {"shifcon.band": "2,3"}
    assert sorted(logged.metrics) == [1, 2, 3, 4]
    assert "probe/bitext_retrieval_accuracy" in logged.metrics[2]


class FakeTracker:
    def __init__(self) -> None:
        self.params: dict = {}
        self.tags: dict = {}
        self.metrics: dict = {}

    def log_metrics(self, metrics, step):
        self.metrics[step] = dict(metrics)

    def log_params(self, params):
        self.params.update(params)

    def set_tag(self, key, value):
        self.tags[key] = value

    def log_artifact(self, path, artifact_path=None):
        pass


def test_auto_band_schema_and_preflight(tmp_path, tiny_model_dir):
    cfg = ShifConMethod(name="shifcon", band="auto")
    assert cfg.band == "auto" and cfg.probe_tolerance == 0.1
    with pytest.raises(ValueError):
        ShifConMethod(name="shifcon", band="sometimes")
    recipe = validate_recipe(
        {"name": "r", "model": {"backbone": str(tiny_model_dir)}, "method": AUTO}
    )
    preflight(recipe)  # the band check is skipped for auto
    bad = {"name": "r", "model": {"backbone": str(tiny_model_dir)}}
    with pytest.raises(RecipeError, match="method.top_k"):
        preflight(validate_recipe({**bad, "method": {"name": "lens", "top_k": 4}}))


@pytest.mark.slow
def test_probe_cli_writes_json_plot_and_band_into_recipe(tmp_path, tiny):
    path, _, data = tiny
    pairs = tmp_path / "pairs.jsonl"
    rows = pairs_from_rows(data.train_rows, "en")
    pairs.write_text(
        "".join(json.dumps({"lang": p.lang, "en": p.en, "target": p.target}) + "\n" for p in rows)
    )
    recipe = tmp_path / "shifcon.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "name": "keep-me",
                "model": {"backbone": str(path)},
                "method": {"name": "shifcon", "band": [1, 2], "tau": 0.5},
                "training": {"steps": 7},
            },
            sort_keys=False,
        )
    )
    out = tmp_path / "probe"
    args = [
        "--model", str(path), "--pairs", str(pairs), "--languages", "en,fr,sw", "--samples", "8",
        "--out", str(out), "--write-band-into", str(recipe), "--tolerance", "0.2",
    ]  # fmt: skip
    try:
        assert probe_main(args) == 0
    finally:  # the CLI joined a one-process group: leave this process as it was
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    result = json.loads((out / PROBE_FILE).read_text())
    assert result["band"] == [2, 3] and result["tolerance"] == 0.2
    assert result["pairs_per_language"] == {"fr": 8, "sw": 8}
    assert all(0.0 <= v <= 1.0 for v in result["bitext_retrieval_accuracy"])
    assert all(0.0 <= v <= 1.0 for v in result["language_id_accuracy"])
    assert (out / PLOT_FILE).read_bytes()[:4] == b"\x89PNG"
    rewritten = load_recipe(recipe)
    assert rewritten.method.band == (2, 3) and rewritten.method.tau == 0.5
    assert rewritten.name == "keep-me" and rewritten.training.steps == 7


def test_write_band_refuses_other_methods(tmp_path):
    recipe = tmp_path / "sft.yaml"
    recipe.write_text("name: x\nmethod: sft\n")
    with pytest.raises(ValueError, match="not shifcon"):
        write_band_into(recipe, (2, 3))
