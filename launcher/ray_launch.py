"""Workers on a Ray cluster: Ray Train's TorchTrainer runs `loop.run_training` in every worker.

Why Ray Train and not hand-made actors: it already places one worker per bundle of a placement
group (one per GPU, or per `cpus_per_worker` CPU slot), sets up the torch process group
(NCCL on GPU, gloo on CPU) with the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK,
NODE_RANK, MASTER_ADDR, MASTER_PORT) exported before `init_process_group`, and restarts the whole
worker group when one worker dies (`FailureConfig.max_failures`). Our loop then reads the same
environment as under torchrun and resumes from the run directory's newest checkpoint; Ray's own
checkpoint reporting is not used, so there is one checkpoint format for every launcher.

Rank order: Ray Train groups workers by node (placement-group bundle order) and sorts them by
GPU id inside a node, then numbers them 0..n-1; `cluster.placement_strategy: PACK` keeps a
node's ranks contiguous. Every piece of per-rank state (the ZeRO shard files, the data slice of a
global batch) is addressed by that rank number, so a restarted group whose workers landed on
other nodes still loads rank r's shard into rank r.

The run directory must be on storage that every node sees (as on Slurm, or a mounted volume on
Kubernetes); a relative `output_dir` inside a Ray job is moved out of the job's temporary
working directory to `$POLYSHIFT_OUTPUT_ROOT` (default `~/polyshift`).
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any, Literal

from config.errors import UserError, WorkersFailed
from config.recipe import dump_recipe, load_recipe
from config.schema import ClusterSection, Recipe

ROOT = Path(__file__).resolve().parent.parent
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for the entrypoint
OUTPUT_ROOT_ENV = "POLYSHIFT_OUTPUT_ROOT"
AUTOSCALING_ENV = "POLYSHIFT_RAY_AUTOSCALING"
PID_DIR_ENV = "POLYSHIFT_PID_DIR"  # tests: each worker writes <dir>/rank<r>.pid
# Environment a worker needs from the submitting shell; Ray starts workers from the raylet's
# environment, not the driver's, so these are copied explicitly.
FORWARDED_PREFIXES = ("POLYSHIFT_", "MLFLOW_", "HF_", "TRANSFORMERS_", "NCCL_", "GLOO_", "TORCH_")
FORWARDED_NAMES = ("TOKENIZERS_PARALLELISM", "PYTHONHASHSEED", "CUBLAS_WORKSPACE_CONFIG")

Mode = Literal["inprocess", "local", "ray"]


def ray_job_config() -> dict[str, Any] | None:
    """The job config when this process is a Ray job's entrypoint, else None."""
    raw = os.environ.get(JOB_CONFIG_ENV)
    if not raw:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return {}


def ray_address_known() -> bool:
    return bool(os.environ.get("RAY_ADDRESS")) or ray_job_config() is not None


def choose_launcher(cluster: ClusterSection, environ: dict[str, str] | None = None) -> Mode:
    """Who starts the workers for this invocation of run.py.

    A process that already has a RANK is a worker (torchrun, srun, a Ray Train worker) and trains
    in-process; otherwise `cluster.launcher` decides, `auto` picking Ray only when a cluster is
    known, so a plain `python launcher/run.py` on a laptop never needs Ray.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env:
        return "inprocess"
    ray_known = bool(env.get("RAY_ADDRESS")) or bool(env.get(JOB_CONFIG_ENV))
    if cluster.launcher == "ray" or (cluster.launcher == "auto" and ray_known):
        return "ray"
    return "local" if cluster.world_size > 1 else "inprocess"


def _forwarded_env() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if k.startswith(FORWARDED_PREFIXES) or k in FORWARDED_NAMES
    }


def _job_working_dir() -> bool:
    config = ray_job_config()
    return bool(config and (config.get("runtime_env") or {}).get("working_dir"))


def _relocate_outputs(recipe: Recipe, run_dir: Path, env: dict[str, str]) -> Path:
    """Keep outputs out of a Ray job's temporary working directory (deleted with the job)."""
    if not _job_working_dir():
        return run_dir.resolve()
    root = Path(os.environ.get(OUTPUT_ROOT_ENV, "~/polyshift")).expanduser().resolve()
    if not Path(recipe.output_dir).is_absolute():
        recipe.output_dir = str(root / recipe.output_dir)
        run_dir = Path(recipe.output_dir) / recipe.name
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(dump_recipe(recipe), encoding="utf-8")
        print(f"ray: job working dir is temporary; run directory: {run_dir}", flush=True)
    if (
        recipe.tracking.enabled
        and recipe.tracking.tracking_uri is None
        and "MLFLOW_TRACKING_URI" not in env
    ):
        root.mkdir(parents=True, exist_ok=True)
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    return run_dir.resolve()


def _use_gpu(cluster: ClusterSection) -> bool:
    import ray

    if cluster.device == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0 and cluster.gpus_per_worker > 0
    if cluster.device == "gpu" and cluster.gpus_per_worker <= 0:
        raise UserError("cluster.gpus_per_worker: must be > 0 when cluster.device is gpu")
    return cluster.device == "gpu"


def launch_ray_workers(recipe: Recipe, run_dir: Path) -> None:
    """Run the recipe on the Ray cluster (RAY_ADDRESS, the job's cluster, or a local instance)."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    env = _forwarded_env()
    run_dir = _relocate_outputs(recipe, run_dir, env)
    in_job = ray_job_config() is not None
    runtime_env: dict[str, Any] | None = None
    if not in_job:
        # A driver outside a Ray job ships no code: the cluster shares this filesystem (Slurm).
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        runtime_env = {"env_vars": {"PYTHONPATH": path}}
    ray.init(runtime_env=runtime_env, log_to_driver=True)
    try:
        cluster = recipe.cluster
        use_gpu = _use_gpu(cluster)
        device = "gpu" if use_gpu else "cpu"
        if not use_gpu:
            env["DS_ACCELERATOR"] = "cpu"
        # Ray Train's print patch would show every line of the loop twice in the job log.
        env.setdefault(
            "RAY_TRAIN_ENABLE_PRINT_PATCH", os.environ.get("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
        )
        resources = {"CPU": cluster.cpus_per_worker}
        if use_gpu:
            resources["GPU"] = cluster.gpus_per_worker
        _check_capacity(cluster.world_size, resources)
        launch_id = uuid.uuid4().hex[:8]
        print(
            f"ray: {cluster.world_size} worker(s) x {resources}, {cluster.placement_strategy}, "
            f"backend {'nccl' if use_gpu else 'gloo'}, max_failures {cluster.max_failures}, "
            f"launch {launch_id}",
            flush=True,
        )
        trainer = TorchTrainer(
            _train_worker,
            train_loop_config={
                "run_dir": str(run_dir),
                "device": device,
                "launch_id": launch_id,
                # Outside a job the workers run where the driver runs (shared filesystem).
                "cwd": None if in_job else os.getcwd(),
            },
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ScalingConfig(
                num_workers=cluster.world_size,
                use_gpu=use_gpu,
                resources_per_worker=resources,
                placement_strategy=cluster.placement_strategy,
            ),
            run_config=RunConfig(
                name=f"{recipe.name}-{launch_id}",
                storage_path=str(run_dir / "ray"),
                failure_config=FailureConfig(max_failures=cluster.max_failures),
                worker_runtime_env={"env_vars": env},
            ),
        )
        try:
            trainer.fit()
        except Exception as exc:
            failures = getattr(exc, "worker_failures", None) or {}
            causes = [getattr(e, "cause", e) for e in failures.values()]
            user = bool(causes) and all(isinstance(c, UserError) for c in causes)
            raise WorkersFailed(
                f"ray: the worker group failed ({cluster.max_failures} restart(s) allowed by "
                f"cluster.max_failures); worker messages are above: {str(exc)[:2000]}",
                exit_code=2 if user else 1,
            ) from None
    finally:
        ray.shutdown()


def _check_capacity(workers: int, per_worker: dict[str, float]) -> None:
    """Fail at once when the cluster can never fit the worker group: Ray Train would otherwise
    retry the group's start forever. With an autoscaler that adds nodes on demand
    (POLYSHIFT_RAY_AUTOSCALING=1, set by cluster/ray/cluster.yaml) it only warns."""
    import ray

    total = ray.cluster_resources()
    for name, amount in per_worker.items():
        have, need = total.get(name, 0), workers * amount
        if have >= need:
            continue
        message = (
            f"cluster: the Ray cluster has {have:g} {name} but {workers} workers need {need:g} "
            f"(cluster.nodes x workers_per_node x {name.lower()}s_per_worker)"
        )
        if os.environ.get(AUTOSCALING_ENV) == "1":
            print(f"ray: warning: {message}; waiting for the autoscaler", file=sys.stderr)
        else:
            raise UserError(message + f"; set {AUTOSCALING_ENV}=1 if an autoscaler adds nodes")


def _next_attempt(run_dir: Path, launch_id: str, rank: int) -> int:
    """1 for the first start of this rank in this launch, 2 after the first restart, ...

    Ray Train does not tell a worker which attempt it is; each rank counts its own starts in
    the (shared) run directory, so no two processes write the same file.
    """
    directory = run_dir / "ray" / "attempts" / launch_id
    directory.mkdir(parents=True, exist_ok=True)
    n = 1 + sum(1 for p in directory.glob(f"rank{rank}.*"))
    (directory / f"rank{rank}.{n}").touch()
    return n


def _train_worker(config: dict[str, Any]) -> None:
    """Body of every Ray Train worker: check the environment Ray set, then the one loop."""
    import ray.train
    import torch.distributed as dist

    from launcher.loop import run_training

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    expected = {
        "RANK": rank,
        "WORLD_SIZE": world,
        "LOCAL_RANK": context.get_local_rank(),
    }
    wrong = {k: os.environ.get(k) for k, v in expected.items() if os.environ.get(k) != str(v)}
    if wrong or not dist.is_initialized() or dist.get_rank() != rank:
        raise RuntimeError(f"Ray Train environment is inconsistent: {wrong}, expected {expected}")
    if config["device"] == "gpu":
        import torch

        device = ray.train.torch.get_device()
        if device != torch.device("cuda", context.get_local_rank()):
            raise RuntimeError(
                f"rank {rank}: Ray assigned {device} but LOCAL_RANK is {context.get_local_rank()}"
                " (use cluster.gpus_per_worker: 1)"
            )
    if config.get("cwd") and Path(config["cwd"]).is_dir():
        os.chdir(config["cwd"])
    run_dir = Path(config["run_dir"])
    attempt = _next_attempt(run_dir, config["launch_id"], rank)
    if attempt > 1:
        # Fault injection describes the first attempt; the restarted group must be able to finish.
        os.environ.pop("POLYSHIFT_FAIL_AT", None)
        if rank == 0:
            print(f"ray: worker group restarted (attempt {attempt})", flush=True)
    pid_dir = os.environ.get(PID_DIR_ENV)
    if pid_dir:
        Path(pid_dir).mkdir(parents=True, exist_ok=True)
        (Path(pid_dir) / f"rank{rank}.pid").write_text(f"{os.getpid()}\n")
    recipe = load_recipe(run_dir / "recipe.yaml")
    recipe.cluster.device = config["device"]
    run_training(recipe, run_dir)
