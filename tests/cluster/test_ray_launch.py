"""Ray launch on a real local Ray cluster: job submission, restarts after an injected crash and
after a kill -9 (bitwise the weights of an uninterrupted run), one MLflow run per job, and
resuming on another world size through a DeepSpeed universal checkpoint.

One job carries both failures, because every Ray Train attempt costs the start of fresh worker
processes (torch, DeepSpeed, transformers imports): seconds that add up on a 2-core machine. The
driver-outside-a-job path (RAY_ADDRESS) runs in tests/cluster/test_slurm.py under ray_job.sbatch."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from config.schema import ClusterSection
from launcher.checkpoints import COMPLETE, CheckpointStore
from launcher.ray_launch import choose_launcher
from launcher.universal import UNIVERSAL_TAG, saved_world_size
from tests.helpers.cluster_procs import ROOT, leftovers, ray_head, wait_for
from tests.helpers.runs import run_cli, tiny_recipe, write_recipe

STEPS = 12  # long enough that a kill after a checkpoint lands mid-run
SETS = {"training": {"steps": STEPS}, "checkpoint": {"every": 2, "keep_last": 20}}


def recipe_file(tmp: Path, model_dir: Path, name: str, **sections) -> Path:
    merged = {**SETS, **sections}
    recipe = tiny_recipe(model_dir, tmp, **merged)
    recipe["name"] = name
    recipe["cluster"] = {"workers_per_node": 2, "max_failures": 1, **recipe.get("cluster", {})}
    return write_recipe(tmp / f"{name}.yaml", recipe)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "export" / "model.safetensors")


def assert_same_weights(run_dir: Path, reference: Path) -> None:
    ours, ref = weights(run_dir), weights(reference)
    assert ours.keys() == ref.keys()
    for key in ref:
        assert torch.equal(ours[key], ref[key]), key


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.parametrize(
    ("launcher", "env", "world", "expected"),
    [
        ("auto", {}, 1, "inprocess"),
        ("auto", {}, 2, "local"),
        ("auto", {"RAY_ADDRESS": "127.0.0.1:6379"}, 1, "ray"),
        ("auto", {"RAY_JOB_CONFIG_JSON_ENV_VAR": "{}"}, 2, "ray"),
        ("local", {"RAY_ADDRESS": "127.0.0.1:6379"}, 2, "local"),
        ("ray", {}, 1, "ray"),
        ("ray", {"RANK": "0", "RAY_ADDRESS": "x"}, 2, "inprocess"),  # already a worker
    ],
)
def test_launcher_choice(launcher, env, world, expected):
    cluster = ClusterSection(launcher=launcher, workers_per_node=world)
    assert choose_launcher(cluster, env) == expected


def test_relative_outputs_leave_the_jobs_temporary_working_dir(tmp_path, monkeypatch):
    """Inside a Ray job the cwd is Ray's unpacked copy of the working dir (deleted with the job):
    relative outputs and the default MLflow store move to POLYSHIFT_OUTPUT_ROOT."""
    from config.recipe import load_recipe
    from launcher.ray_launch import _relocate_outputs

    package = tmp_path / "_ray_pkg_abc"
    package.mkdir()
    monkeypatch.chdir(package)
    job = {"runtime_env": {"working_dir": "gcs://_ray_pkg_abc.zip"}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    monkeypatch.setenv("POLYSHIFT_OUTPUT_ROOT", str(tmp_path / "shared"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = write_recipe(tmp_path / "r.yaml", {"name": "rel", "output_dir": "runs"})
    recipe = load_recipe(path)
    env: dict[str, str] = {}
    run_dir = _relocate_outputs(recipe, Path("runs") / "rel", env)
    assert run_dir == tmp_path / "shared" / "runs" / "rel"
    assert load_recipe(run_dir / "recipe.yaml").output_dir == str(tmp_path / "shared" / "runs")
    assert env["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path / 'shared' / 'mlflow.db'}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    log = tmp_path_factory.mktemp("ray_head") / "head.log"
    with ray_head(num_cpus=4, log=log) as head:
        yield head
    assert not leftovers(head.temp_dir), "Ray processes outlived the test cluster"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir) -> Path:
    """The uninterrupted 2-worker run, by the local elastic agent (no Ray)."""
    tmp = tmp_path_factory.mktemp("reference")
    path = recipe_file(tmp, tiny_model_dir, "reference", cluster={"launcher": "local"})
    proc = run_cli(str(path), cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "runs" / "reference"


def _ray(cluster, *args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["ray", "job", *args], env=cluster.env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_ray_job_restarts_after_crash_and_kill_9_one_mlflow_run(
    tmp_path, tiny_model_dir, cluster, reference, mlflow_server
):
    """`ray job submit` of a 2-worker recipe. Attempt 1 dies by injected failure after step 3
    (rank 1); attempt 2 resumes from step 2 and loses a worker to a real SIGKILL after its first
    checkpoint; attempt 3 finishes. Weights equal the uninterrupted run's, bit for bit, and the
    three attempts logged into one MLflow run."""
    import mlflow

    experiment = f"ray-test-{tmp_path.name}"
    tracking = {"enabled": True, "tracking_uri": mlflow_server, "experiment": experiment}
    tracking |= {"log_system_metrics": False, "log_model": False}
    path = recipe_file(
        tmp_path, tiny_model_dir, "job", tracking=tracking, cluster={"max_failures": 2}
    )
    pids = tmp_path / "pids"
    env_vars = {"POLYSHIFT_FAIL_AT": "train_step:3:1", "POLYSHIFT_PID_DIR": str(pids)}
    # Ray Train's controller looks at its workers every 2 s by default: each of the two deaths
    # and the end of attempt 3 waited up to that long to be noticed.
    env_vars["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.5"
    submitted = _ray(
        cluster, "submit", "--no-wait", "--address", cluster.dashboard_url,
        "--working-dir", str(ROOT), "--runtime-env-json", json.dumps({"env_vars": env_vars}),
        "--", "python", "launcher/run.py", str(path),
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    job_id = re.search(r"Job '([^']+)' submitted", submitted.stdout + submitted.stderr).group(1)
    run = tmp_path / "runs" / "job"
    try:
        # Attempt 2 is training once it has written a checkpoint of its own (attempt 1 died at 3).
        wait_for(lambda: list(run.glob("ray/attempts/*/rank1.2")), 300, what="the restart")
        step4 = run / "checkpoints" / "step_00000004" / COMPLETE
        wait_for(step4.is_file, 300, what="attempt 2's first checkpoint")
        victim = int((pids / "rank1.pid").read_text())
        os.kill(victim, signal.SIGKILL)
        logs = _ray(cluster, "logs", "--follow", "--address", cluster.dashboard_url, job_id)
    except BaseException:
        _ray(cluster, "stop", "--address", cluster.dashboard_url, job_id, timeout=60)
        raise
    out = logs.stdout + logs.stderr

    def final_status() -> str | None:
        done = _ray(cluster, "status", "--address", cluster.dashboard_url, job_id, timeout=60)
        found = re.search(r"Job '[^']+' (succeeded|failed|stopped)", done.stdout + done.stderr)
        return found.group(1) if found else None

    assert wait_for(final_status, 120, poll_s=1.0, what="the job's end") == "succeeded", out[-5000:]
    assert "injected failure at train_step step 3" in out
    assert "worker group restarted (attempt 2)" in out
    assert "worker group restarted (attempt 3)" in out
    assert re.search(r"resumed from \S+step_00000002 at step 2", out)
    assert re.search(r"resumed from \S+step_0000000[46] at step [46]", out)
    assert int((pids / "rank1.pid").read_text()) != victim
    # What reached the cluster: the code, without .venv, .git, run outputs or caches.
    sessions = Path(cluster.temp_dir).glob("session_2*/runtime_resources/working_dir_files/*")
    unpacked = [p for p in sessions if p.is_dir()]
    assert len(unpacked) == 1 and (unpacked[0] / "launcher" / "run.py").is_file()
    shipped = {p.name for p in unpacked[0].iterdir()}
    assert not shipped & {".venv", ".git", "runs", "mlflow.db", ".pytest_cache", ".ruff_cache"}
    assert summary(run)["world_size"] == 2
    assert_same_weights(run, reference)
    client = mlflow.MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1  # every restarted group continued the run the first one started
    assert runs[0].info.run_id == json.loads((run / "run.json").read_text())["mlflow_run_id"]
    assert runs[0].info.status == "FINISHED"
    steps = {m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")}
    assert steps == set(range(1, STEPS + 1))


@pytest.mark.slow
def test_resume_on_another_world_size_through_universal_checkpoint(
    tmp_path, tiny_model_dir, reference
):
    """Checkpoint of the 2-worker run at step 8, resumed by 1 worker: converted once, loaded
    universally, and the run continues where the 2-worker run went."""
    run = tmp_path / "runs" / "uni"
    shutil.copytree(reference / "checkpoints", run / "checkpoints")
    store = CheckpointStore(run / "checkpoints", 20)
    for tag in store.complete_tags():
        if int(tag.split("_")[1]) > 8:
            shutil.rmtree(run / "checkpoints" / tag)
    assert store.latest() == "step_00000008"
    assert saved_world_size(run / "checkpoints" / "step_00000008") == 2
    path = recipe_file(tmp_path, tiny_model_dir, "uni", cluster={"workers_per_node": 1})
    proc = run_cli(str(path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "at step 8 (universal checkpoint: saved by 2 workers, loaded by 1)" in proc.stdout
    assert (run / "checkpoints" / "step_00000008" / UNIVERSAL_TAG).is_dir()
    info = json.loads((run / "checkpoints" / f"step_{STEPS:08d}" / COMPLETE).read_text())
    assert info["world_size"] == 1  # later checkpoints are ordinary ones of the new size
    ours, ref = summary(run), summary(reference)
    assert ours["world_size"] == 1 and len(ours["losses"]) == STEPS
    assert ours["losses"][:8] == ref["losses"][:8]  # restored from the checkpoint
    # Same data, same optimizer state: only the reduction order differs between world sizes.
    assert ours["losses"][8:] == pytest.approx(ref["losses"][8:], rel=1e-4)
    ours_w, ref_w = weights(run), weights(reference)
    for key in ref_w:
        torch.testing.assert_close(ours_w[key], ref_w[key], rtol=1e-4, atol=1e-5)
