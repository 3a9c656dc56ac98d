"""The sbatch wrappers on a real single-node Slurm (installed and started by
cluster/slurm/local_slurm.sh): Ray on Slurm, and torchrun on Slurm."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers.cluster_procs import RAY_NO_PRESTART, ROOT, leftovers, tool_env
from tests.helpers.runs import tiny_recipe, write_recipe
from tests.helpers.servers import service_port

pytestmark = pytest.mark.slow  # a real Slurm: daemons, sbatch jobs

LOCAL_SLURM = ROOT / "cluster" / "slurm" / "local_slurm.sh"


def _sh(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(LOCAL_SLURM), *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def slurm():
    if os.geteuid() != 0:
        pytest.skip("a local Slurm needs root (it installs packages and starts slurmctld/slurmd)")
    if not shutil.which("sbatch") and not shutil.which("apt-get"):
        pytest.skip("Slurm is not installed and apt-get is not available to install it")
    installed = _sh("install")  # a no-op when present (CI installs it in .ci/run)
    if installed.returncode != 0:
        pytest.skip(f"Slurm could not be installed here: {installed.stderr.strip()[-500:]}")
    started = _sh("start")
    try:
        assert started.returncode == 0, started.stderr[-3000:]
        yield
    finally:
        stopped = _sh("stop", timeout=120)
        assert stopped.returncode == 0, stopped.stderr[-2000:]


def sbatch(script: str, output: Path, *args: str, env: dict[str, str]) -> int:
    proc = subprocess.run(
        ["sbatch", "--parsable", "--output", str(output), str(ROOT / "cluster" / "slurm" / script),
         *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.strip().split(";")[0])


def wait_job(job: int, timeout_s: float = 300) -> tuple[str, str]:
    """(state, exit code) once the job has ended; no accounting, so ask the controller."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = subprocess.run(
            ["scontrol", "show", "job", str(job)], capture_output=True, text=True, timeout=30
        ).stdout
        state = re.search(r"JobState=(\w+)", info)
        if state and state.group(1) not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"):
            return state.group(1), re.search(r" ExitCode=(\S+)", info).group(1)
        if time.monotonic() > deadline:
            subprocess.run(["scancel", str(job)], timeout=30)
            raise TimeoutError(f"Slurm job {job} still running after {timeout_s} s")
        time.sleep(0.5)


@pytest.fixture
def spaced(tmp_path) -> Path:
    """Recipe and outputs under a path with a space: the wrappers must quote."""
    path = tmp_path / "with space"
    path.mkdir()
    return path


def test_ray_job_sbatch_runs_recipe_and_tears_down(slurm, spaced, tiny_model_dir):
    recipe = tiny_recipe(tiny_model_dir, spaced, cluster={"workers_per_node": 2})
    recipe["name"] = "slurm_ray"
    path = write_recipe(spaced / "ray recipe.yaml", recipe)
    env = tool_env(
        {
            "POLYSHIFT_HOME": str(ROOT),
            "POLYSHIFT_RAY_HEAD_IP": "127.0.0.1",
            "POLYSHIFT_RAY_PORT": str(service_port()),
            "POLYSHIFT_RAY_DASHBOARD_PORT": str(service_port()),
            "POLYSHIFT_RAY_AGENT_PORT": str(service_port()),
            "POLYSHIFT_RAY_CLIENT_PORT": str(service_port()),
            **RAY_NO_PRESTART,
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",  # the job's end noticed sooner
        }
    )
    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RANK"):
        env.pop(name, None)
    log = spaced / "ray job.out"
    job = sbatch("ray_job.sbatch", log, str(path), "--set", "training.steps=2", env=env)
    try:
        state, code = wait_job(job)
        text = log.read_text()
        assert (state, code) == ("COMPLETED", "0:0"), text[-5000:]
        assert "ray_cluster: 1/1 Ray node(s) joined" in text
        assert "ray: 2 worker(s)" in text  # trained through Ray Train, not in the batch shell
        assert "ray_job: teardown complete (exit code 0)" in text
        run = spaced / "runs" / "slurm_ray"
        summary = json.loads((run / "summary.json").read_text())
        assert summary["world_size"] == 2 and summary["steps"] == 2
        assert (run / "export" / "model.safetensors").is_file()
        assert not leftovers(f"/tmp/ray_{job}"), "Ray processes outlived the Slurm job"
    finally:
        shutil.rmtree(f"/tmp/ray_{job}", ignore_errors=True)


def test_torchrun_sbatch_runs_two_processes(slurm, spaced, tiny_model_dir):
    recipe = tiny_recipe(tiny_model_dir, spaced, cluster={"workers_per_node": 2})
    recipe["name"] = "slurm_torchrun"
    path = write_recipe(spaced / "torchrun recipe.yaml", recipe)
    env = tool_env(
        {
            "POLYSHIFT_HOME": str(ROOT),
            "POLYSHIFT_MASTER_ADDR": "127.0.0.1",
            "POLYSHIFT_MASTER_PORT": str(service_port()),
        }
    )
    for name in ("RAY_ADDRESS", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    log = spaced / "torchrun job.out"
    job = sbatch("torchrun.sbatch", log, str(path), "--set", "training.steps=2", env=env)
    state, code = wait_job(job)
    text = log.read_text()
    assert (state, code) == ("COMPLETED", "0:0"), text[-5000:]
    assert "x 2 process(es)" in text and "finished with exit code 0" in text
    run = spaced / "runs" / "slurm_torchrun"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2
    assert (run / "export" / "model.safetensors").is_file()
