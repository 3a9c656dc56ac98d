"""Resume on a different world size through DeepSpeed universal checkpoints.

A ZeRO (stage >= 1) checkpoint stores the optimizer state partitioned by data-parallel rank, so
DeepSpeed refuses to load it into another number of ranks. When the newest checkpoint was
written by a different world size, rank 0 converts it once (`deepspeed.checkpoint.
ds_to_universal`) into `<checkpoint>/universal/` (per-parameter fp32 weights and Adam moments),
and the engine is built with `checkpoint.load_universal: true` and loads that folder. The
converted copy lives inside its checkpoint, so `keep_last` removes both together, and a
restarted job reuses a finished conversion. Later checkpoints are ordinary ones again.

The conversion can take long for a large model; the other ranks wait for it on the (shared)
filesystem rather than in a collective, which would hit the process group's timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from config.schema import Recipe
from launcher.checkpoints import COMPLETE
from parallel.distributed import DistContext, barrier

UNIVERSAL_TAG = "universal"
DONE = "polyshift_universal.json"
FAILED = "universal.error"
WORKERS_ENV = "POLYSHIFT_UC_WORKERS"  # parallel extract/merge processes (default: in-process)
TIMEOUT_ENV = "POLYSHIFT_UC_TIMEOUT_S"
_OPTIM_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


def saved_world_size(checkpoint: Path) -> int | None:
    """World size that wrote `checkpoint`: recorded at commit, else counted from its shards."""
    info = json.loads((checkpoint / COMPLETE).read_text())
    if "world_size" in info:
        return int(info["world_size"])
    ranks = {m.group(1) for p in checkpoint.iterdir() if (m := _OPTIM_FILE.match(p.name))}
    return len(ranks) or None


def needs_universal(recipe: Recipe, checkpoint: Path, world_size: int) -> bool:
    # ZeRO-0 keeps the whole optimizer state in one file that loads into any world size.
    if recipe.parallel.engine != "deepspeed" or recipe.parallel.zero_stage == 0:
        return False
    saved = saved_world_size(checkpoint)
    return saved is not None and saved != world_size


def convert(checkpoint: Path, workers: int = 1) -> Path:
    """Write `checkpoint/universal` (atomically: a staging folder renamed into place)."""
    from deepspeed.checkpoint import ds_to_universal

    out = checkpoint / UNIVERSAL_TAG
    staging = checkpoint / f"{UNIVERSAL_TAG}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=str(checkpoint),
        output_folder=str(staging),
        num_extract_workers=workers,
        num_merge_workers=workers,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=False,
    )
    ds_to_universal.main(args)
    (staging / DONE).write_text(json.dumps({"source": checkpoint.name, "time": time.time()}))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(staging, out)
    # ds_to_universal names its output in `latest_universal`; point it at the final name.
    (checkpoint / "latest_universal").write_text(UNIVERSAL_TAG)
    return out


def ensure_universal(checkpoint: Path, ctx: DistContext) -> Path:
    """Rank 0 converts (once); every rank returns when the converted folder is complete."""
    out, failed = checkpoint / UNIVERSAL_TAG, checkpoint / FAILED
    if (out / DONE).is_file():
        return out
    barrier()  # nobody may read a stale error marker that rank 0 is about to remove
    if ctx.is_rank0:
        failed.unlink(missing_ok=True)
    barrier()
    if ctx.is_rank0:
        try:
            convert(checkpoint, int(os.environ.get(WORKERS_ENV, "1")))
        except BaseException as exc:
            failed.write_text(f"{type(exc).__name__}: {exc}")
            raise
    else:
        deadline = time.monotonic() + float(os.environ.get(TIMEOUT_ENV, str(6 * 3600)))
        while not (out / DONE).is_file():
            if failed.is_file():
                raise RuntimeError(f"rank 0 failed to convert {checkpoint}: {failed.read_text()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited too long for the universal conversion of {checkpoint}")
            time.sleep(1.0)
    barrier()
    return out


@dataclass(frozen=True)
class ResumePlan:
    """How to build the engine and where to load from for the newest checkpoint."""

    recipe: Recipe  # the recipe the engine is built with (universal loading switched on)
    root: Path | None  # DeepSpeed load_dir
    tag: str | None  # DeepSpeed tag
    note: str = ""


def plan_resume(recipe: Recipe, root: Path, tag: str | None, ctx: DistContext) -> ResumePlan:
    if tag is None:
        return ResumePlan(recipe, None, None)
    checkpoint = root / tag
    if not needs_universal(recipe, checkpoint, ctx.world_size):
        return ResumePlan(recipe, root, tag)
    saved = saved_world_size(checkpoint)
    ensure_universal(checkpoint, ctx)
    engine_recipe = recipe.model_copy(deep=True)
    engine_recipe.parallel.deepspeed = {
        **engine_recipe.parallel.deepspeed,
        "checkpoint": {
            **engine_recipe.parallel.deepspeed.get("checkpoint", {}),
            "load_universal": True,
        },
    }
    note = f" (universal checkpoint: saved by {saved} workers, loaded by {ctx.world_size})"
    return ResumePlan(engine_recipe, checkpoint, UNIVERSAL_TAG, note)
