"""Hostile or careless use: two jobs in one run directory, credentials in a tracking URI."""

from __future__ import annotations

import json
import os

import yaml

from launcher.run import main as run_main
from launcher.run_lock import LOCK_FILE, run_dir_lock
from launcher.tracking import redact


def _recipe(tmp_path, backbone, name="locked"):
    """A recipe that passes the preflight (a real tiny backbone: its files are checked)."""
    recipe = {
        "name": name,
        "output_dir": str(tmp_path / "runs"),
        "model": {"backbone": str(backbone)},
        "tracking": {"enabled": False},
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path, tmp_path / "runs" / name


def test_second_job_into_a_held_run_directory_fails_at_once_naming_the_holder(
    tmp_path, tiny_model_dir, capsys
):
    path, run_dir = _recipe(tmp_path, tiny_model_dir)
    run_dir.mkdir(parents=True)
    with run_dir_lock(run_dir):
        assert run_main([str(path)]) == 2
    err = capsys.readouterr().err
    assert f"pid {os.getpid()}" in err and "is in use" in err
    assert not (run_dir / "recipe.yaml").exists()  # the holder's files are left alone


def test_a_released_or_stale_lock_does_not_block(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK_FILE).write_text(json.dumps({"pid": 999999, "host": "gone", "started": 0}))
    with run_dir_lock(run_dir):  # a lock file whose holder is dead holds no flock
        info = json.loads((run_dir / LOCK_FILE).read_text())
        assert info["pid"] == os.getpid()
    with run_dir_lock(run_dir):  # released on exit
        pass


def test_credentials_in_uris_are_redacted():
    assert redact("https://alice:s3cret@mlflow.example:5000/api") == (
        "https://alice:***@mlflow.example:5000/api"
    )
    assert redact("tracking server http://bob:pw@127.0.0.1:5000 unreachable") == (
        "tracking server http://bob:***@127.0.0.1:5000 unreachable"
    )
    assert redact("s3://bucket/x?token=abc123&region=eu") == "s3://bucket/x?token=***&region=eu"
    assert redact("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_only_rank_0_of_a_worker_group_takes_the_lock(
    tmp_path, tiny_model_dir, monkeypatch, capsys
):
    """torchrun starts run.py once per rank: rank 1 must not be refused by rank 0's lock."""
    path, run_dir = _recipe(tmp_path, tiny_model_dir)
    run_dir.mkdir(parents=True)
    monkeypatch.setenv("RANK", "1")
    called = []
    monkeypatch.setattr("launcher.run._launch", lambda mode, recipe, d: called.append(mode))
    with run_dir_lock(run_dir):  # rank 0 of the same job
        assert run_main([str(path)]) == 0
    assert called == ["inprocess"]
    monkeypatch.setenv("RANK", "0")
    with run_dir_lock(run_dir):  # a second job's rank 0
        assert run_main([str(path)]) == 2
    assert "is in use" in capsys.readouterr().err
