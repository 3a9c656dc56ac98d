"""Lens on the megatron-core engine (CPU, gloo) against the DeepSpeed path: same numbers.

top_k 3 of the tiny model's 4 layers, so under PP=2 the trained layers split over the stages
(layer 2 on stage 0, layers 3-4 on stage 1): the Lens terms are computed on the last stage
and their gradient crosses the pipeline. Both megatron layouts run in one pair of gloo
processes, in the launcher's "steps" mode (`tests/helpers/megatron_worker.py`); the
DeepSpeed reference is one process of the same worker (started alongside). Tolerances are
those of tests/parallel/test_megatron.py: 5e-3 relative for TP=2, 1e-5 for PP=2 (measured on
CPU: <= 1.4e-6 relative on every logged value at both, <= 3.6e-6 on any weight). A fourth job
trains through the launcher's loop with a checkpoint and a resume (the frozen layers leave
holes in the optimizer state of megatron's stacked layer tensors).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from config.recipe import validate_recipe
from methods.lens import DIRECTIONS_FILE, META_FILE
from methods.registry import recipe_errors
from parallel.distributed import free_port
from tests.helpers.runs import ROOT, clean_env, tiny_recipe

STEPS = 3
LENS = {
    "name": "lens",
    "top_k": 3,
    "retain": 10.0,
    "pull": 1.0,
    "push_scale": 0.5,
    "prompts": {"count": 12, "batch_size": 4, "max_length": 48},
}
# tp2 and pp2 train layers 2-4 (under PP=2 on both stages); pp2_frozen trains layer 4 only, so
# stage 0 has no trainable parameter (megatron skips its backward, its optimizer is empty).
JOBS = {"tp2": {"tp": 2}, "pp2": {"pp": 2}, "pp2_frozen": {"pp": 2, "top_k": 1}}
TERMS = ("loss_retain", "loss_push", "loss_pull")
# The retain MSE starts at ~0 (theta == theta_0 on step 1: round-off of the two engines).
RETAIN_ATOL = 1e-9


def _recipe(
    model_dir: Path, out: Path, run: str, engine: str, tp: int = 1, pp: int = 1, top_k: int = 3
) -> dict:
    recipe = tiny_recipe(
        model_dir,
        out,
        method={**LENS, "top_k": top_k},
        training={"steps": STEPS, "lr": 3e-3},
        parallel={"engine": engine, "tensor_parallel": tp, "pipeline_parallel": pp},
        cluster={"workers_per_node": tp * pp, "device": "cpu"},
    )
    recipe["name"] = run
    return recipe


def _torchrun(procs: int, jobs: list[dict], tmp: Path, name: str) -> subprocess.Popen:
    """Start the worker on `jobs` in `procs` gloo processes (output in tmp/<name>.log)."""
    spec = tmp / f"{name}.json"
    spec.write_text(json.dumps(jobs))
    env = {**clean_env(), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        "-m", "tests.helpers.megatron_worker", str(spec), str(tmp),
    ]  # fmt: skip
    with (tmp / f"{name}.log").open("w") as log:
        return subprocess.Popen(cmd, cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT)


def _wait(procs: dict[str, subprocess.Popen], tmp: Path) -> None:
    try:
        for name, proc in procs.items():
            assert proc.wait(timeout=600) == 0, (tmp / f"{name}.log").read_text()[-4000:]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()  # torchrun passes it on to its workers


@pytest.fixture(scope="module")
def lens_runs(tmp_path_factory, tiny_model_dir) -> Path:
    tmp = tmp_path_factory.mktemp("megatron_lens")
    m = tiny_model_dir
    jobs = [
        {"name": name, "steps": True, "export_method": True,
         "recipe": _recipe(m, tmp, name, "megatron", **layout)}
        for name, layout in JOBS.items()
    ]  # fmt: skip
    # Trained in two runs (a distributed checkpoint at step 2, then resumed): Lens's state
    # (reference table, directions, pair-batch counter) comes back on every stage.
    resumed = _recipe(m, tmp, "pp2_resumed", "megatron", pp=2)
    jobs.append({"name": "pp2_resumed", "recipe": resumed, "train": True, "stages": [2, STEPS]})
    megatron = _torchrun(2, jobs, tmp, "megatron")
    refs = [
        {"name": f"ds_top{k}", "steps": True, "export_method": True,
         "recipe": _recipe(m, tmp, f"ds_top{k}", "deepspeed", top_k=k)}
        for k in sorted({layout.get("top_k", 3) for layout in JOBS.values()})
    ]  # fmt: skip
    deepspeed = _torchrun(1, refs, tmp, "deepspeed")  # alongside: start-up time overlaps
    _wait({"megatron": megatron, "deepspeed": deepspeed}, tmp)
    return tmp


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    """The model's tensors of an export (every safetensors file but Lens's own)."""
    out: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        if file.name != DIRECTIONS_FILE:
            out.update(load_file(file))
    return out


def _steps(run: Path) -> list[dict]:
    return json.loads((run / "steps.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("job,rtol", [("tp2", 5e-3), ("pp2", 1e-5), ("pp2_frozen", 1e-5)])
def test_lens_on_megatron_matches_deepspeed(lens_runs, tiny_model_dir, job, rtol):
    """Per-step loss, Lens terms and gradient norm, the exported weights and Lens's own
    files (directions, metadata) of the megatron run equal the DeepSpeed run's."""
    top_k = JOBS[job].get("top_k", 3)
    ref = lens_runs / f"ds_top{top_k}"
    ours, theirs = _steps(lens_runs / job), _steps(ref)
    assert len(ours) == len(theirs) == STEPS
    assert set(theirs[0]) == {"loss", "grad_norm", *TERMS, "loss_logits_width"}
    for key in ("loss", "grad_norm", *TERMS):
        got = torch.tensor([s[key] for s in ours], dtype=torch.float64)
        want = torch.tensor([s[key] for s in theirs], dtype=torch.float64)
        atol = RETAIN_ATOL if key == "loss_retain" else 0.0
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=key)
    assert theirs[-1]["loss_retain"] > 1e3 * RETAIN_ATOL  # the layers moved: retain is no 0

    wa, wb = _weights(lens_runs / job / "export"), _weights(ref / "export")
    assert set(wa) == set(wb)
    for name in wb:
        torch.testing.assert_close(wa[name], wb[name], rtol=rtol, atol=1e-5, msg=name)
    # Only the top k layers train (under PP=2 with k = 3: on both stages).
    trained = list(range(5 - top_k, 5))
    before = _weights(tiny_model_dir)
    changed = {k for k in before if not torch.equal(before[k], wa[k])}
    assert all(k.startswith("model.layers.") for k in changed), sorted(changed)
    assert {int(k.split(".")[2]) + 1 for k in changed} == set(trained), sorted(changed)

    meta = json.loads((lens_runs / job / "export" / META_FILE).read_text())
    assert meta == json.loads((ref / "export" / META_FILE).read_text())
    assert meta["trained_layers"] == trained
    got = load_file(lens_runs / job / "export" / DIRECTIONS_FILE)
    want = load_file(ref / "export" / DIRECTIONS_FILE)
    assert set(got) == set(want) == {"agnostic_direction", "specific_basis", "deltas"}
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=1e-5, msg=name)


@pytest.mark.slow
def test_lens_resumes_exactly_on_megatron(lens_runs):
    """Stopped after step 2 and resumed from the distributed checkpoint: the losses and Lens
    terms of an uninterrupted run, the same weights and directions."""
    resumed = json.loads((lens_runs / "pp2_resumed" / "summary.json").read_text())
    straight = _steps(lens_runs / "pp2")
    assert resumed["losses"] == [s["loss"] for s in straight]
    for got, want in zip(resumed["method_metrics"], straight, strict=True):
        assert got == {k: want[k] for k in got} and set(got) == set(TERMS)
    wa, wb = _weights(lens_runs / "pp2_resumed" / "export"), _weights(lens_runs / "pp2" / "export")
    assert set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wb)
    da = load_file(lens_runs / "pp2_resumed" / "export" / DIRECTIONS_FILE)
    db = load_file(lens_runs / "pp2" / "export" / DIRECTIONS_FILE)
    assert all(torch.equal(da[k], db[k]) for k in db)
    assert (lens_runs / "pp2_resumed" / "checkpoints" / "step_00000002").is_dir()


def test_recomputation_is_refused_for_lens_on_megatron(tmp_path):
    """megatron's reentrant recomputation leaves the layers above frozen ones without gradient
    (measured: TP=2, grad norm 0 at every step), so the recipe is refused before any work."""
    recipe = _recipe(tmp_path, tmp_path, "r", "megatron", tp=2)
    assert recipe_errors(validate_recipe(recipe)) == []
    recipe["model"]["gradient_checkpointing"] = True
    (error,) = recipe_errors(validate_recipe(recipe))
    assert error.startswith("model.gradient_checkpointing: Lens on the megatron engine")
    ds = _recipe(tmp_path, tmp_path, "r", "deepspeed")
    ds["model"]["gradient_checkpointing"] = True
    assert recipe_errors(validate_recipe(ds)) == []
