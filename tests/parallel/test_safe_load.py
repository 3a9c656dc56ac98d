"""Checkpoint files are data: a planted pickle is refused, naming the file, before it can run."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from deepspeed.runtime.fp16.loss_scaler import LossScaler  # imported at collection: it probes
from deepspeed.runtime.zero.config import ZeroStageEnum  # the machine with a subprocess

from parallel.safe_load import FORCE_ENV, UnsafeCheckpoint, check_checkpoint, load_tensors


class _Planted:
    """Unpickling this calls os.system: what an attacker would put in a checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(autouse=True)
def _restore_force_env():
    before = os.environ.get(FORCE_ENV)
    yield
    if before is None:
        os.environ.pop(FORCE_ENV, None)
    else:
        os.environ[FORCE_ENV] = before


def test_planted_pickle_in_checkpoint_is_refused_by_name(tmp_path):
    step = tmp_path / "checkpoints" / "step_00000002"
    step.mkdir(parents=True)
    torch.save({"weight": torch.ones(2)}, step / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    marker = tmp_path / "pwned"
    torch.save({"client": _Planted(marker)}, step / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(UnsafeCheckpoint, match="optim_states.pt.*(posix|os).system"):
        check_checkpoint(step)
    with pytest.raises(UnsafeCheckpoint, match="optim_states.pt"):
        load_tensors(step / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert not marker.exists()


def test_forced_weights_only_reaches_third_party_loads(tmp_path):
    """DeepSpeed calls torch.load(..., weights_only=False): the switch overrides it."""
    marker = tmp_path / "pwned"
    path = tmp_path / "client_state.pt"
    torch.save(_Planted(marker), path)
    os.environ.pop(FORCE_ENV, None)
    from parallel.safe_load import enforce_weights_only

    enforce_weights_only()
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=False)
    assert not marker.exists()


def test_engine_files_with_numpy_rng_state_and_deepspeed_types_load(tmp_path):
    state = {
        "rng": np.random.RandomState(0).get_state()[1],
        "zero_stage": ZeroStageEnum.weights,
        "loss_scaler": LossScaler(1.0),
        "t": torch.arange(3),
    }
    path = tmp_path / "optim_states.pt"
    torch.save(state, path)
    check_checkpoint(tmp_path)
    loaded = load_tensors(path)
    assert torch.equal(loaded["t"], torch.arange(3))
    assert (loaded["rng"] == state["rng"]).all()
    assert loaded["zero_stage"] == ZeroStageEnum.weights


def test_non_torch_file_with_checkpoint_name_is_refused(tmp_path):
    (tmp_path / "model_states.pt").write_bytes(pickle.dumps({"a": 1}))
    assert not zipfile.is_zipfile(tmp_path / "model_states.pt")
    with pytest.raises(UnsafeCheckpoint, match="model_states.pt.*not a torch checkpoint"):
        check_checkpoint(tmp_path)
