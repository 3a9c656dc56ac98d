"""Cluster files that cannot run here (ray up, KubeRay) are at least well-formed and consistent
with the recipes; the working-dir pre-flight check stops an oversized upload."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from config.recipe import load_recipe
from launcher.ray_package import PackageTooLarge, check_working_dir, measure
from tests.helpers.cluster_procs import ROOT, tool_env

CLUSTER = ROOT / "cluster"


def entrypoint_recipe(entrypoint: str):
    """`python launcher/run.py RECIPE [--set k=v ...]` -> the resolved, validated recipe."""
    words = shlex.split(entrypoint)
    assert words[:2] == ["python", "launcher/run.py"], words
    recipe = ROOT / words[2]
    assert recipe.is_file() and recipe.parent == ROOT / "recipes", recipe
    sets = [words[i + 1] for i, word in enumerate(words) if word == "--set"]
    assert len(words) == 3 + 2 * len(sets), "only --set options may follow the recipe"
    return load_recipe(recipe, sets)


def test_ray_cluster_yaml():
    config = yaml.safe_load((CLUSTER / "ray" / "cluster.yaml").read_text())
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type"):
        assert config.get(key), key
    assert config["provider"]["type"]
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = [name for name in types if name != config["head_node_type"]]
    assert workers and all(types[w]["max_workers"] >= types[w]["min_workers"] for w in workers)
    assert config["max_workers"] >= max(types[w]["max_workers"] for w in workers)
    for name, node in types.items():
        assert "node_config" in node and "resources" in node, name
    setup = "\n".join(config["setup_commands"])
    assert "pip install" in setup and "-e ." in setup and "torch" in setup  # as in the Makefile
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])
    assert any("--address=$RAY_HEAD_IP" in c for c in config["worker_start_ray_commands"])
    mounts = config["file_mounts"]
    assert "." in mounts.values()
    excluded = " ".join(config["rsync_exclude"])
    for pattern in (".git", ".venv", "runs", "checkpoints", "mlflow.db"):
        assert pattern in excluded, pattern


def test_kuberay_rayjob_manifest():
    manifest = yaml.safe_load((CLUSTER / "k8s" / "rayjob.yaml").read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayJob"
    assert manifest["metadata"]["name"]
    spec = manifest["spec"]
    recipe = entrypoint_recipe(spec["entrypoint"])
    cluster_spec = spec["rayClusterSpec"]
    head = cluster_spec["headGroupSpec"]
    assert head["template"]["spec"]["containers"][0]["image"]
    groups = cluster_spec["workerGroupSpecs"]
    assert groups
    gpus, pods = 0, 0
    for group in groups:
        container = group["template"]["spec"]["containers"][0]
        per_pod = int(container["resources"]["limits"].get("nvidia.com/gpu", 0))
        assert per_pod > 0 and container["image"], group["groupName"]
        gpus += per_pod * group["replicas"]
        pods += group["replicas"]
    # The recipe asks for exactly the GPUs the manifest provides, one worker per GPU.
    assert recipe.cluster.device == "gpu" and recipe.cluster.gpus_per_worker == 1
    assert recipe.cluster.world_size == gpus and recipe.cluster.nodes == pods
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"] and runtime_env["env_vars"]["POLYSHIFT_OUTPUT_ROOT"]


@pytest.mark.slow
def test_slurm_wrappers_are_valid_bash():
    for script in ("ray_job.sbatch", "torchrun.sbatch", "local_slurm.sh"):
        proc = subprocess.run(["bash", "-n", str(CLUSTER / "slurm" / script)], capture_output=True)
        assert proc.returncode == 0, (script, proc.stderr)
    proc = subprocess.run(["bash", "-n", str(CLUSTER / "ray" / "submit.sh")], capture_output=True)
    assert proc.returncode == 0, proc.stderr


def test_repository_working_dir_is_small():
    size = measure(ROOT)
    names = {Path(p).parts[0] for _, p in size.largest}
    assert size.bytes < 20 * 2**20 and not names & {".venv", ".git", "runs"}, size.describe()


@pytest.fixture
def oversized(tmp_path) -> Path:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "train.py").write_text("print('hi')\n")
    with open(tmp_path / "src" / "weights.bin", "wb") as f:
        f.truncate(600 * 2**20)  # sparse: 600 MiB apparent, no disk
    return tmp_path


@pytest.mark.slow
def test_oversized_working_dir_is_an_error_before_upload(oversized):
    with pytest.raises(PackageTooLarge, match=r"600\.0 MiB.*weights\.bin"):
        check_working_dir(oversized)  # Ray's own limit: 512 MiB
    proc = subprocess.run(
        [sys.executable, "-m", "launcher.ray_package", str(oversized)],
        env=tool_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1 and "over the limit" in proc.stderr
    # Excluded files do not count, as for Ray itself.
    (oversized / ".rayignore").write_text("*.bin\n")
    assert check_working_dir(oversized).files == 2  # train.py and .rayignore
    assert check_working_dir(oversized, limit=2**20).bytes < 2**20


@pytest.mark.slow
def test_submit_script_stops_before_uploading(oversized):
    """cluster/ray/submit.sh runs the check first; `ray` is never reached here."""
    fake = oversized / "repo"
    (fake / "cluster" / "ray").mkdir(parents=True)
    script = fake / "cluster" / "ray" / "submit.sh"
    script.write_text((CLUSTER / "ray" / "submit.sh").read_text())
    (oversized / "src" / "weights.bin").rename(fake / "weights.bin")
    env = tool_env({"PYTHON": sys.executable, "PYTHONPATH": str(ROOT)})
    env["PATH"] = str(Path(sys.executable).parent) + ":/usr/bin:/bin"
    proc = subprocess.run(
        ["bash", str(script), "recipes/x.yaml"], env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1 and "over the limit" in proc.stderr, proc.stderr
