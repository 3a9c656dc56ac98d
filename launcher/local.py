"""Several workers on this machine without a cluster: torch's elastic agent as the supervisor.

The agent starts `world_size` copies of `launcher.worker` with the torchrun environment, kills
the group when one dies, and restarts it up to `cluster.max_failures` times; each restart
resumes from the run directory's latest checkpoint.
"""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

from config.errors import WorkersFailed
from config.schema import Recipe
from parallel.distributed import free_port


def launch_local_workers(recipe: Recipe, run_dir: Path) -> None:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=recipe.cluster.world_size,
        run_id=f"polyshift-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{free_port()}",
        rdzv_configs={"is_host": True},
        max_restarts=recipe.cluster.max_failures,
        monitor_interval=0.5,
        start_method="spawn",
        local_addr="127.0.0.1",
    )
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "launcher.worker", str(run_dir))
    except ChildFailedError as exc:
        codes = sorted({failure.exitcode for failure in exc.failures.values()})
        raise WorkersFailed(
            f"{len(exc.failures)} of {recipe.cluster.world_size} workers failed "
            f"(exit codes {codes}); their messages are above",
            exit_code=2 if codes == [2] else 1,
        ) from None
