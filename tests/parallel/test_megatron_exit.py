"""The end of a multi-process run: rank 0's MLflow model upload never holds the other ranks in a
collective (a 70B export takes longer than the process group's timeout, 600 s).

The run's group gets a collective timeout shorter than rank 0's (deliberately slowed, real)
upload; the other ranks leave as `launcher/worker.py` leaves, with no collective after
`run_training`. Before the fix the other rank died in the loop's last all-gather.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from parallel.distributed import free_port
from tests.helpers.runs import ROOT, clean_env, tiny_recipe

GROUP_TIMEOUT_S = 10
UPLOAD_DELAY_S = 15  # > GROUP_TIMEOUT_S


@pytest.mark.slow
def test_slow_model_upload_outlasts_the_group_timeout(tmp_path, tiny_model_dir):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    recipe = tiny_recipe(
        tiny_model_dir,
        tmp_path,
        method="sft",
        training={"steps": 1},
        parallel={"engine": "megatron"},
        cluster={"workers_per_node": 2, "device": "cpu"},
        tracking={"enabled": True, "tracking_uri": uri, "experiment": "exit",
                  "log_system_metrics": False, "log_model": True},
    )  # fmt: skip
    recipe["name"] = "slow_upload"
    job = {"name": "slow_upload", "recipe": recipe, "exit_like_launcher": True,
           "slow_upload_s": UPLOAD_DELAY_S}  # fmt: skip
    spec = tmp_path / "jobs.json"
    spec.write_text(json.dumps([job]))
    env = {**clean_env(), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        "-m", "tests.helpers.megatron_worker", str(spec), str(tmp_path), str(GROUP_TIMEOUT_S),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "is uploaded when the run ends" in proc.stderr

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    (exp,) = [e for e in client.search_experiments() if e.name == "exit"]
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    (model,) = client.search_logged_models([exp.experiment_id])
    assert model.source_run_id == run.info.run_id
