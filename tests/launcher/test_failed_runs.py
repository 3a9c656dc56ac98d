"""A failed run never reports success: divergence stops the run loudly, planted pickles never run."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from config.errors import TrainingDiverged
from launcher.checkpoints import CheckpointStore
from launcher.loop import check_finite, strict_json
from parallel.engine import StepResult
from tests.helpers.runs import train


def test_non_finite_loss_names_the_step_and_the_last_good_checkpoint(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints", keep_last=2)
    check_finite(StepResult(loss=1.5, grad_norm=0.3, metrics={"loss_mcl": 2.0}), 1, store)
    with pytest.raises(TrainingDiverged, match=r"step 7: loss=nan; no checkpoint"):
        check_finite(StepResult(loss=math.nan, grad_norm=None, metrics={}), 7, store)
    with pytest.raises(TrainingDiverged, match=r"step 3: grad_norm=inf"):
        check_finite(StepResult(loss=0.1, grad_norm=math.inf, metrics={}), 3, store)
    with pytest.raises(TrainingDiverged, match=r"loss_mcl=nan"):
        check_finite(StepResult(loss=0.1, grad_norm=1.0, metrics={"loss_mcl": math.nan}), 3, store)


def test_summary_json_is_strict():
    text = strict_json({"losses": [1.0, math.nan, math.inf], "eval": {"sw": -math.inf}})
    assert json.loads(text) == {"losses": [1.0, None, None], "eval": {"sw": None}}
    assert "NaN" not in text and "Infinity" not in text


@pytest.mark.slow
def test_diverged_run_fails_without_export_and_mlflow_marks_it_failed(tmp_path, tiny_model_dir):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc, run = train(
        tmp_path,
        tiny_model_dir,
        "nan",
        "training.lr=1e30",  # finite (the schema refuses inf), yet it diverges
        tracking={"enabled": True, "tracking_uri": uri, "experiment": "nan"},
    )
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "training diverged at step 2: grad_norm=inf" in proc.stderr  # step 1 applied lr=1e30
    assert "Traceback" not in proc.stderr
    assert not (run / "export").exists()
    assert not (run / "summary.json").exists()
    assert CheckpointStore(run / "checkpoints", keep_last=2).latest() is None

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    (exp,) = [e for e in client.search_experiments() if e.name == "nan"]
    (found,) = client.search_runs([exp.experiment_id])
    assert found.info.status == "FAILED"


class _Planted:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
def test_resume_refuses_a_planted_pickle_naming_the_file(tmp_path, tiny_model_dir):
    proc, run = train(tmp_path, tiny_model_dir, "planted", "training.steps=2", "checkpoint.every=1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    latest = CheckpointStore(run / "checkpoints", keep_last=2).latest()
    (victim,) = sorted((run / "checkpoints" / latest).glob("*optim_states.pt"))[:1]
    marker = tmp_path / "pwned"
    torch.save({"planted": _Planted(marker)}, victim)

    proc, _ = train(tmp_path, tiny_model_dir, "planted", "training.steps=3", "checkpoint.every=1")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert victim.name in proc.stderr and "refusing to load" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not marker.exists()


def test_leftovers_of_an_interrupted_commit_are_discarded(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints", keep_last=2)
    good = store.root / "step_00000002"
    good.mkdir(parents=True)
    (good / "polyshift_complete.json").write_text("{}")
    (good / "polyshift_complete.json.tmp123").write_text("{")
    (store.root / "latest.tmp4567").write_text("step_0000")
    (store.staging / "step_00000004").mkdir(parents=True)
    removed = store.discard_leftovers()
    assert len(removed) == 3
    assert sorted(p.name for p in store.root.iterdir()) == ["step_00000002"]
    assert store.latest() == "step_00000002"


def test_a_full_disk_during_save_names_the_path_and_the_cause(tmp_path):
    import errno

    from launcher.loop import save_failure

    store = CheckpointStore(tmp_path / "checkpoints", keep_last=2)
    (store.root / "step_00000002").mkdir(parents=True)
    (store.root / "step_00000002" / "polyshift_complete.json").write_text("{}")
    where = store.staging / "step_00000004"
    err = save_failure(OSError(errno.ENOSPC, "No space left on device"), where, store)
    assert str(where) in str(err) and "No space left on device" in str(err)
    assert "step_00000002 is intact" in str(err)
    err = save_failure(RuntimeError("basic_ios::clear: iostream error"), where, store)
    assert str(where) in str(err) and "iostream error" in str(err)
