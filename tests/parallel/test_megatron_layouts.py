"""Sequence parallelism and the distributed optimizer on CPU (gloo, TP=2 x DP=2): same numbers.

Both change only where activations, gradients and optimizer state live, never the math, so a
TP=2 x DP=2 run with either (or both) must reproduce the plain TP=2 x DP=2 run: losses, the
per-layer contrastive losses, gradient norms and the weights after 4 steps, within the
tolerance of the PP=2 parity test in tests/parallel/test_megatron.py (1e-5 relative; weights
also 1e-5 absolute). Measured on CPU: <= 6e-7 relative on every logged value, <= 3e-7 on any
weight; before the `_full_rows` fix the SP run's gradient norm was exactly twice the plain one.
One set of 4 gloo processes runs every layout.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from parallel.distributed import free_port
from tests.helpers.runs import ROOT, clean_env, tiny_recipe
from tests.parallel.test_megatron import SHIFCON, STEPS, export_weights

LAYOUTS = {  # name: (sequence_parallel, distributed_optimizer)
    "plain": (False, False),
    "sp": (True, False),
    "distopt": (False, True),
    "sp_distopt": (True, True),
}
SFT_LAYOUTS = ("plain", "sp", "distopt")
RTOL = 1e-5  # tests/parallel/test_megatron.py: PP=2 against DeepSpeed


def _recipe(model_dir: Path, out: Path, run: str, method, sp: bool, distopt: bool) -> dict:
    recipe = tiny_recipe(
        model_dir,
        out,
        method=method,
        training={"steps": STEPS},
        checkpoint={"every": 2, "keep_last": 2},
        parallel={
            "engine": "megatron",
            "tensor_parallel": 2,
            "pipeline_parallel": 1,
            "sequence_parallel": sp,
            "distributed_optimizer": distopt,
        },
        cluster={"workers_per_node": 4, "device": "cpu"},
    )
    recipe["name"] = run
    return recipe


@pytest.fixture(scope="module")
def layout_runs(tmp_path_factory, tiny_model_dir) -> Path:
    tmp = tmp_path_factory.mktemp("layouts")
    jobs = [
        {"name": f"shifcon_{name}", "steps": True,
         "recipe": _recipe(tiny_model_dir, tmp, f"shifcon_{name}", SHIFCON, *flags)}
        for name, flags in LAYOUTS.items()
    ] + [
        # Trained in two runs (checkpoint at step 2, resumed): the distributed optimizer's
        # state goes through a megatron distributed checkpoint and back.
        {"name": "resumed_sp_distopt", "train": True, "stages": [2, STEPS],
         "recipe": _recipe(tiny_model_dir, tmp, "resumed_sp_distopt", SHIFCON, True, True)},
    ] + [
        {"name": f"sft_{name}", "steps": True,
         "recipe": _recipe(tiny_model_dir, tmp, f"sft_{name}", "sft", *LAYOUTS[name])}
        for name in SFT_LAYOUTS
    ]  # fmt: skip
    spec = tmp / "jobs.json"
    spec.write_text(json.dumps(jobs))
    env = {**clean_env(), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        "-m", "tests.helpers.megatron_worker", str(spec), str(tmp),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tmp


def _steps(root: Path, job: str) -> list[dict]:
    return json.loads((root / job / "steps.json").read_text())


def _assert_same_run(root: Path, job: str, ref: str, rtol: float) -> None:
    ours, theirs = _steps(root, job), _steps(root, ref)
    assert len(ours) == len(theirs) == STEPS
    assert set(ours[0]) == set(theirs[0])
    for key in theirs[0]:  # loss, grad_norm, loss_lm (+ loss_mcl and loss_mcl/L<l> for ShifCon)
        got = torch.tensor([s[key] for s in ours], dtype=torch.float64)
        want = torch.tensor([s[key] for s in theirs], dtype=torch.float64)
        worst = ((got - want).abs() / want.abs()).max().item()
        torch.testing.assert_close(got, want, rtol=rtol, atol=0, msg=f"{key}: {worst:.2e}")
    wa, wb = export_weights(root / job / "export"), export_weights(root / ref / "export")
    assert set(wa) == set(wb)
    for name in wb:
        torch.testing.assert_close(wa[name], wb[name], rtol=rtol, atol=1e-5, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["shifcon", "sft"])
def test_sequence_parallel_changes_nothing(layout_runs, method):
    """Under SP the contrastive rows are gathered over TP for a computation every TP rank
    repeats: its backward must hand each rank its slice, not the TP-sum (which doubled the
    gradient norm at TP=2)."""
    _assert_same_run(layout_runs, f"{method}_sp", f"{method}_plain", RTOL)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["shifcon", "sft"])
def test_distributed_optimizer_changes_nothing(layout_runs, method):
    _assert_same_run(layout_runs, f"{method}_distopt", f"{method}_plain", RTOL)


@pytest.mark.slow
def test_resume_with_distributed_optimizer_is_exact(layout_runs):
    """Saved at step 2 and resumed: the same losses and metrics as 4 uninterrupted steps
    (torch's Adam: megatron-core restored the step count into the parameter groups only)."""
    resumed = json.loads((layout_runs / "resumed_sp_distopt" / "summary.json").read_text())
    straight = _steps(layout_runs, "shifcon_sp_distopt")
    assert resumed["losses"] == [s["loss"] for s in straight]
    for got, want in zip(resumed["method_metrics"], straight, strict=True):
        assert got == {k: want[k] for k in got}
    assert (layout_runs / "resumed_sp_distopt" / "checkpoints" / "step_00000002").is_dir()


@pytest.mark.slow
def test_training_loss_never_gathers_the_vocabulary(layout_runs, tiny_model_dir):
    """Vocab-parallel cross-entropy: each TP rank's loss sees its own V/TP logits."""
    from transformers import AutoConfig

    from parallel.megatron_model import DecoderShape

    shape = DecoderShape.from_hf(AutoConfig.from_pretrained(tiny_model_dir))
    for job in ("shifcon_plain", "shifcon_sp_distopt", "sft_sp"):
        widths = {s["loss_logits_width"] for s in _steps(layout_runs, job)}
        assert widths == {shape.padded_vocab(2) // 2}, job


@pytest.mark.slow
def test_sequence_parallel_with_distributed_optimizer(layout_runs):
    """The 70B recipe's combination, TP=2 x DP=2."""
    _assert_same_run(layout_runs, "shifcon_sp_distopt", "shifcon_plain", RTOL)
