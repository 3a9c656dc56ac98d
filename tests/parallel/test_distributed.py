"""How a finished rank ends: exit code 0, nothing it printed lost, no teardown after."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_a_finished_rank_exits_0_with_its_output_flushed():
    script = (
        "import atexit, sys\n"
        "from parallel.distributed import exit_finished_rank\n"
        "atexit.register(lambda: print('atexit ran'))\n"
        "print('last line', end='')\n"
        "sys.stderr.write('err line')\n"
        "exit_finished_rank()\n"
        "print('never')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffered, as ranks
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "last line"  # flushed; no interpreter teardown (atexit) after it
    assert proc.stderr.endswith("err line")
