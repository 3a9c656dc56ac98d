"""Tracker against a real MLflow server on loopback: what reaches it, and what never does."""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow import MlflowClient
from mlflow.entities import ViewType

from launcher.tracking import (
    HTTP_DEFAULTS,
    Tracker,
    flatten,
    sanitize_key,
    share_identical_files,
)
from parallel.distributed import free_port

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENT = "polyshift-tests"


@pytest.fixture(scope="module")
def server(mlflow_server: str) -> str:
    return mlflow_server


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    for name in HTTP_DEFAULTS:
        monkeypatch.delenv(name, raising=False)
    saved = dict(os.environ)
    yield
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)  # later tests must not inherit a (soon dead) test server
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def hf_export(tmp_path_factory) -> Path:
    """A real (tiny) Hugging Face export: safetensors, config and a byte-level tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.helpers.tiny import byte_tokenizer

    out = tmp_path_factory.mktemp("export") / "model"
    config = LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=300,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    byte_tokenizer().save_pretrained(out)
    return out


def _tracker(uri: str | None, tmp_path: Path, **kwargs) -> Tracker:
    options = {
        "enabled": True,
        "is_rank0": True,
        "tracking_uri": uri,
        "experiment": EXPERIMENT,
        "run_name": "test",
        "log_system_metrics": False,
        "workdir": tmp_path,
        **kwargs,
    }
    return Tracker(**options)


def _warnings(capfd) -> list[str]:
    return [line for line in capfd.readouterr().err.splitlines() if line.startswith("mlflow: ")]


def _run_count(client: MlflowClient) -> int:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return 0
    return len(client.search_runs([experiment.experiment_id], run_view_type=ViewType.ALL))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- pure helpers -------------------------------------------------------------------------------


def test_flatten() -> None:
    nested = {"a": {"b": 1, "c": {"d": "x"}}, "l": [1, "two"], "t": (0.9, 0.95), "n": None}
    assert flatten(nested) == {
        "a.b": 1,
        "a.c.d": "x",
        "l": '[1, "two"]',
        "t": "[0.9, 0.95]",
        "n": "None",
    }
    assert flatten({"x": {}}, prefix="cfg") == {"cfg.x": "{}"}
    assert flatten({1: True}) == {"1": True}


def test_sanitize_key() -> None:
    assert sanitize_key("eval/en/loss") == "eval/en/loss"
    assert sanitize_key("loss@step:1") == "loss_step_1"
    assert sanitize_key("/a//b/../c/") == "a/b/__/c"
    assert sanitize_key("..hidden") == "_..hidden"
    long = sanitize_key("k" * 400)
    assert len(long) == 250 and long != sanitize_key("k" * 401)


def test_share_identical_files_links_only_equal_bytes(tmp_path: Path) -> None:
    source, copy = tmp_path / "export", tmp_path / "mlruns" / "model"
    (source / "sub").mkdir(parents=True)
    (copy / "deep").mkdir(parents=True)
    (source / "w.bin").write_bytes(b"weights")
    (source / "sub" / "tok.json").write_bytes(b"{}")
    (source / "other.bin").write_bytes(b"aaaa")
    (copy / "deep" / "w.bin").write_bytes(b"weights")  # same name, size, bytes: linked
    (copy / "tok.json").write_bytes(b"{}")  # found under another folder: linked
    (copy / "other.bin").write_bytes(b"bbbb")  # same name and size, other bytes: kept
    (copy / "extra.bin").write_bytes(b"weights")  # same bytes, other name: kept
    assert share_identical_files(source, copy) == (2, 0)
    assert os.path.samefile(source / "w.bin", copy / "deep" / "w.bin")
    assert os.path.samefile(source / "sub" / "tok.json", copy / "tok.json")
    assert (copy / "other.bin").read_bytes() == b"bbbb"
    assert not os.path.samefile(source / "w.bin", copy / "extra.bin")
    assert sorted(p.name for p in copy.rglob("*") if p.is_file()) == [
        "extra.bin", "other.bin", "tok.json", "w.bin"
    ]  # fmt: skip
    assert share_identical_files(source, copy) == (0, 0)  # already one copy: nothing to do


def _stored_bytes(root: Path, pattern: str) -> int:
    """Bytes on disk of the files matching ``pattern`` under ``root``, each inode once."""
    inodes = {(f.stat().st_dev, f.stat().st_ino): f.stat().st_size for f in root.rglob(pattern)}
    return sum(inodes.values())


@pytest.mark.slow
@pytest.mark.parametrize("flavor", ["transformers", "pyfunc"])
def test_local_store_keeps_one_copy_of_the_export(
    tmp_path: Path, hf_export: Path, flavor: str
) -> None:
    from launcher.serving import PYFUNC_CODE, shifcon_signature

    export = tmp_path / "runs" / "r" / "export"
    shutil.copytree(hf_export, export)
    weights = export / "model.safetensors"
    digest, size = _sha256(weights), weights.stat().st_size
    with _tracker(None, tmp_path, registered_model_name=f"one-copy-{flavor}") as tracker:
        run_id = tracker.start()
        tracker.log_metrics({"eval/loss_mean": 1.5}, 3)
        tracker.log_layer_metrics({2: {"eval/bitext_by_layer/sw_x2en": 0.25},
                                   3: {"eval/bitext_by_layer/sw_x2en": 0.5}})  # fmt: skip
        if flavor == "transformers":
            uri = tracker.log_hf_model(export, step=3)
        else:
            uri = tracker.log_pyfunc_model(
                export, python_model=PYFUNC_CODE, code_paths=[],
                signature=shifcon_signature(), step=3,
            )  # fmt: skip
    assert uri == f"models:/one-copy-{flavor}/1"
    # The model carries step 3's metrics, not layer 3 of a curve (logged after the model).
    client = MlflowClient(tracker.tracking_uri)
    (output,) = client.get_run(run_id).outputs.model_outputs
    assert {m.key for m in client.get_logged_model(output.model_id).metrics} == {"eval/loss_mean"}
    curve = client.get_metric_history(run_id, "eval/bitext_by_layer/sw_x2en")
    assert sorted((m.step, m.value) for m in curve) == [(2, 0.25), (3, 0.5)]
    assert weights.stat().st_nlink == 2  # the export and MLflow's model share the bytes
    assert _stored_bytes(tmp_path, "*.safetensors") == size
    # Every export file (config, tokenizer too) is shared; only MLflow's own files are new.
    assert all(f.stat().st_nlink >= 2 for f in export.iterdir()), export
    # Deleting the run directory leaves the registered model whole.
    shutil.rmtree(tmp_path / "runs")
    local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "dl")))
    (copy,) = local.rglob("model.safetensors")
    assert _sha256(copy) == digest


# -- against the server -------------------------------------------------------------------------


@pytest.mark.slow
def test_params_and_metrics_reach_server(server: str, tmp_path: Path) -> None:
    client = MlflowClient(server)
    params = {
        "model": {"name": "tiny", "layers": 2, "languages": ["en", "fr"]},
        "optim": {"lr": 1e-3, "betas": (0.9, 0.95)},
        "note": None,
        "prompt": "x" * 7000,
        "bulk": {f"k{i}": i for i in range(150)},  # more than one 100-param batch
    }
    with _tracker(server, tmp_path, log_system_metrics=True) as tracker:
        run_id = tracker.start(params=params, tags={"polyshift.method": "sft"})
        assert run_id is not None and tracker.active
        for step in range(5):
            metrics = {"train/loss": 1.0 / (step + 1), "eval/en@loss": step}
            tracker.log_metrics({**metrics, "nan": math.nan, "inf": math.inf, "s": "x"}, step)
        tracker.log_dict({"path": Path("/data"), "n": 1}, "config/resolved.json")
        tracker.log_text("| lang | loss |\n", "eval/table.md")
        tracker.set_tag("checkpoint.latest", "/ckpt/step-5")

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    got = run.data.params
    assert got["model.name"] == "tiny"
    assert got["model.layers"] == "2"
    assert got["model.languages"] == '["en", "fr"]'
    assert got["optim.betas"] == "[0.9, 0.95]"
    assert got["note"] == "None"
    assert len(got["prompt"]) == 6000 and got["prompt"].endswith("...[truncated 7000 chars]")
    assert sum(key.startswith("bulk.") for key in got) == 150
    history = client.get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(s, 1.0 / (s + 1)) for s in range(5)]
    assert [m.step for m in client.get_metric_history(run_id, "eval/en_loss")] == list(range(5))
    assert not {"nan", "inf", "s"} & set(run.data.metrics)
    assert run.data.tags["polyshift.method"] == "sft"
    assert run.data.tags["checkpoint.latest"] == "/ckpt/step-5"
    local = Path(client.download_artifacts(run_id, "config/resolved.json", str(tmp_path)))
    assert yaml.safe_load(local.read_text()) == {"path": "/data", "n": 1}
    assert [a.path for a in client.list_artifacts(run_id, "eval")] == ["eval/table.md"]


@pytest.mark.slow
def test_non_rank0_and_disabled_touch_nothing(server: str, tmp_path: Path) -> None:
    client = MlflowClient(server)
    if client.get_experiment_by_name(EXPERIMENT) is None:
        client.create_experiment(EXPERIMENT)
    before = _run_count(client)
    (tmp_path / "f.txt").write_text("x")
    for uri, rank0, enabled in ((server, False, True), (None, False, True), (server, True, False)):
        workdir = tmp_path / f"wd-{rank0}-{enabled}-{uri is None}"
        workdir.mkdir()
        with _tracker(uri, workdir, is_rank0=rank0, enabled=enabled) as tracker:
            assert tracker.start(params={"a": 1}, tags={"t": "v"}) is None
            tracker.log_params({"b": 2})
            tracker.log_metrics({"loss": 1.0}, 1)
            tracker.log_dict({"a": 1}, "a.json")
            tracker.log_text("t", "t.txt")
            tracker.log_artifact(tmp_path / "f.txt")
            tracker.set_tag("k", "v")
            assert tracker.log_hf_model(tmp_path) is None
            assert not tracker.active and tracker.run_id is None
        assert list(workdir.iterdir()) == []  # no mlflow.db, no mlruns
    assert _run_count(client) == before

    # A worker rank never even imports mlflow.
    code = (
        "import sys; from launcher.tracking import Tracker\n"
        "t = Tracker(enabled=True, is_rank0=False, tracking_uri=None, experiment='e', run_name=None)\n"
        "assert t.start({'a': 1}) is None; t.log_metrics({'l': 1.0}, 0); t.end()\n"
        "assert 'mlflow' not in sys.modules, 'mlflow imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


@pytest.mark.slow
def test_resume_continues_the_same_run(server: str, tmp_path: Path) -> None:
    client = MlflowClient(server)
    first = _tracker(server, tmp_path, run_name="resumable")
    with first:
        run_id = first.start(params={"lr": 0.1, "seed": 1})
        first.log_metrics({"train/loss": 3.0}, 1)
        first.log_metrics({"train/loss": 2.0}, 2)
    count = _run_count(client)

    # A restarted job: same run, params re-sent (one changed), training continues at step 3.
    second = _tracker(server, tmp_path, run_name="resumable", run_id=run_id)
    with second:
        assert second.start(params={"lr": 0.1, "seed": 2, "restarts": 1}) == run_id
        second.log_metrics({"train/loss": 1.0}, 3)

    assert _run_count(client) == count
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")] == [
        (1, 3.0),
        (2, 2.0),
        (3, 1.0),
    ]
    assert run.data.params == {"lr": "0.1", "seed": "1", "restarts": "1"}
    assert run.data.tags["changed_param.seed"] == "2"


def test_unreachable_server_warns_once(tmp_path: Path, capfd, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")  # the user's choice is kept
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    with _tracker(uri, tmp_path, log_system_metrics=True) as tracker:
        assert tracker.start(params={"a": {"b": 1}}) is None
        for step in range(3):
            tracker.log_metrics({"loss": 1.0}, step)
        tracker.log_params({"c": 2})
        tracker.log_text("x", "x.txt")
        tracker.set_tag("k", "v")
        assert tracker.log_hf_model(tmp_path) is None
        assert not tracker.active
    assert time.monotonic() - started < 15
    warnings = _warnings(capfd)
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"mlflow: tracking server {uri} unreachable (")
    assert warnings[0].endswith("); training continues without tracking")
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"
    assert (
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
        == HTTP_DEFAULTS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
    )
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_failure_mid_run_warns_once_then_goes_quiet(server: str, tmp_path: Path, capfd) -> None:
    client = MlflowClient(server)
    tracker = _tracker(server, tmp_path)
    run_id = tracker.start()
    tracker.log_metrics({"loss": 1.0}, 0)
    client.delete_run(run_id)  # the server now rejects every write to this run
    for step in range(1, 4):
        tracker.log_metrics({"loss": 1.0}, step)
        tracker.log_text("x", "x.txt")
    tracker.end()
    assert not tracker.active and tracker.run_id == run_id
    warnings = _warnings(capfd)
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("mlflow: logging metrics failed (")
    assert warnings[0].endswith("training continues without tracking")
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [0]


@pytest.mark.slow
def test_local_default_store_lives_in_workdir(tmp_path: Path, monkeypatch) -> None:
    workdir, elsewhere = tmp_path / "wd", tmp_path / "cwd"
    workdir.mkdir()
    elsewhere.mkdir()
    # What `mlflow ui` started in workdir reads when nothing is configured.
    monkeypatch.chdir(workdir)
    mlflow.set_tracking_uri(None)
    expected = mlflow.get_tracking_uri()
    assert expected == f"sqlite:///{workdir}/mlflow.db"
    monkeypatch.chdir(elsewhere)

    with _tracker(None, workdir) as tracker:
        run_id = tracker.start(params={"a": {"b": 1}})
        tracker.log_metrics({"loss": 0.5}, 1)
        tracker.log_text("hello", "notes.txt")
    assert tracker.tracking_uri == expected
    assert (workdir / "mlflow.db").is_file()
    assert list(elsewhere.iterdir()) == []
    assert list(workdir.glob("mlruns/*/*/artifacts/notes.txt"))
    run = MlflowClient(expected).get_run(run_id)
    assert run.data.params == {"a.b": "1"} and run.data.metrics == {"loss": 0.5}


@pytest.mark.slow
def test_log_hf_model_registers_transformers_model(
    server: str, tmp_path: Path, hf_export: Path
) -> None:
    name = "polyshift-tiny"
    with _tracker(server, tmp_path, registered_model_name=name) as tracker:
        run_id = tracker.start()
        started = time.monotonic()
        uri = tracker.log_hf_model(hf_export)
        elapsed = time.monotonic() - started
    assert uri == f"models:/{name}/1"
    assert elapsed < 30

    client = MlflowClient(server)
    (version,) = client.search_model_versions(f"name='{name}'")
    assert version.status == "READY" and version.run_id == run_id
    local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "dl")))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    assert {"transformers", "python_function"} <= set(mlmodel["flavors"])
    assert (local / "model" / "config.json").is_file()
    # Copied byte for byte, not re-serialised from loaded weights.
    assert _sha256(local / "model" / "model.safetensors") == _sha256(
        hf_export / "model.safetensors"
    )
    # A server that proxies artifacts got an upload; the export itself is untouched.
    assert (hf_export / "model.safetensors").stat().st_nlink == 1


@pytest.mark.slow
def test_log_hf_model_never_reads_the_weights(server: str, tmp_path: Path, hf_export: Path) -> None:
    export = tmp_path / "export"
    shutil.copytree(hf_export, export)
    weights = export / "model.safetensors"
    weights.write_bytes(os.urandom(weights.stat().st_size))  # unloadable if anyone tried
    with _tracker(server, tmp_path, registered_model_name="polyshift-opaque") as tracker:
        tracker.start()
        uri = tracker.log_hf_model(export)
    assert uri == "models:/polyshift-opaque/1"
    local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "dl")))
    assert "transformers" in yaml.safe_load((local / "MLmodel").read_text())["flavors"]
    assert _sha256(local / "model" / "model.safetensors") == _sha256(weights)


@pytest.mark.slow
def test_log_hf_model_falls_back_to_plain_checkpoint(
    server: str, tmp_path: Path, hf_export: Path, capfd
) -> None:
    export = tmp_path / "no-tokenizer"
    export.mkdir()
    for file in ("config.json", "model.safetensors"):
        shutil.copy(hf_export / file, export / file)
    with _tracker(server, tmp_path, registered_model_name="polyshift-raw") as tracker:
        tracker.start()
        uri = tracker.log_hf_model(export)
        assert tracker.active
    assert uri == "models:/polyshift-raw/1"
    warnings = _warnings(capfd)
    assert len(warnings) == 1 and "logging the checkpoint files instead" in warnings[0]
    (version,) = MlflowClient(server).search_model_versions("name='polyshift-raw'")
    assert version.status == "READY"
    files = {a.path for a in mlflow.artifacts.list_artifacts(artifact_uri=uri)}
    assert {"config.json", "model.safetensors"} <= files
