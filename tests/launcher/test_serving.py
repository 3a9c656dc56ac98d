"""The model a ShifCon run registers in MLflow serves with the shift, and carries the final
metrics: a real training run, a real MLflow store (SQLite in a temporary directory)."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from methods.shifcon.infer import ShiftedLM
from tests.helpers.runs import run_cli, tiny_recipe, write_recipe

pytestmark = pytest.mark.slow  # a training run in a subprocess

NAME = "shifcon-tiny"
STEPS = 2
TRACKING = {"enabled": True, "registered_model_name": NAME, "log_system_metrics": False}
PROMPTS = ["Habari yako, rafiki?", "Bonjour, comment vas-tu ?", "Hello, who are you?", "Salut !"]


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{tmp}/mlflow.db"
    recipe = tiny_recipe(
        tiny_model_dir,
        tmp,
        # A small learning rate keeps the tiny model's answers varied (the shift shows).
        training={"steps": STEPS, "lr": 1e-5},
        method={"name": "shifcon", "band": [1, 3], "mcl_batch_size": 4, "vector_samples": 8},
        tracking=TRACKING | {"tracking_uri": uri},
    )
    proc = run_cli(str(write_recipe(tmp / "r.yaml", recipe)), cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return uri, tmp / "runs" / "tiny" / "export", tmp


def test_registered_shifcon_model_generates_with_the_shift(served):
    uri, export, tmp = served
    mlflow.set_tracking_uri(uri)
    model_uri = f"models:/{NAME}/1"
    local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp / "dl")))
    flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    # Models from code: the project's module, not a pickled object; weights as safetensors.
    assert flavor["model_code_path"].endswith("shifcon_pyfunc.py")
    assert not list(local.rglob("*.pkl"))
    assert (local / "artifacts" / "export" / "shifcon_vectors.safetensors").is_file()

    served_model = mlflow.pyfunc.load_model(model_uri)
    langs = ["sw", "auto", "none", "fr"]
    out = served_model.predict(
        pd.DataFrame({"prompt": PROMPTS, "lang": langs}), params={"max_new_tokens": 8}
    )
    lm = ShiftedLM.from_export(export)
    (detected,) = lm.detect([PROMPTS[1]])
    applied = ["sw", detected, "en", "fr"]
    expected = lm.generate(PROMPTS, applied, max_new_tokens=8)
    assert list(out["answer"]) == expected
    assert list(out["lang"]) == ["sw", detected, "none", "fr"]
    # The shift changes answers (so equality above is not the unshifted model's).
    assert lm.generate(PROMPTS, None, max_new_tokens=8) != expected
    # Language omitted: detected, as "auto".
    bare = served_model.predict(pd.DataFrame({"prompt": PROMPTS[:1]}), params={"max_new_tokens": 4})
    assert list(bare["lang"]) == lm.detect(PROMPTS[:1])
    with pytest.raises(Exception, match="have no vectors"):
        served_model.predict(pd.DataFrame({"prompt": ["x"], "lang": ["xx"]}))


def test_logged_model_links_the_final_metrics(served):
    uri, _, _ = served
    client = MlflowClient(uri)
    version = client.get_model_version(NAME, "1")
    run = client.get_run(version.run_id)
    (output,) = run.outputs.model_outputs
    assert version.source == f"models:/{output.model_id}" and output.step == STEPS
    model = client.get_logged_model(output.model_id)
    keys = {m.key for m in model.metrics}
    assert {"train/loss", "eval/loss_mean", "eval/loss/sw"} <= keys
    assert {m.step for m in model.metrics} == {STEPS}
    assert not [k for k in keys if "_by_layer" in k]  # layer 2 of a curve is not step 2
    # The run's final held-out loss, not the one before training.
    history = client.get_metric_history(run.info.run_id, "eval/loss_mean")
    linked = next(m for m in model.metrics if m.key == "eval/loss_mean")
    assert linked.value == max(history, key=lambda m: m.step).value
    assert linked.value != min(history, key=lambda m: m.step).value


def test_one_copy_of_the_export_and_layer_curves(served):
    uri, export, _ = served
    # A local store: MLflow's model files are hard links to the run dir's export.
    assert (export / "model.safetensors").stat().st_nlink == 2
    assert (export / "shifcon_vectors.safetensors").stat().st_nlink == 2
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("polyshift").experiment_id])
    layers = sorted(int(k.rsplit("/L", 1)[1]) for k in run.data.metrics if "loss_mcl/L" in k)
    assert layers
    for label in ("first", "last"):
        curve = client.get_metric_history(run.info.run_id, f"train/loss_mcl_by_layer/{label}")
        assert sorted(m.step for m in curve) == layers  # the x axis is the layer
        last = {m.step: m.value for m in curve}
    for layer in layers:
        final = client.get_metric_history(run.info.run_id, f"train/loss_mcl/L{layer}")
        assert last[layer] == max(final, key=lambda m: m.step).value
