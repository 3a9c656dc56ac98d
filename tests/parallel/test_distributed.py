"""How a finished rank ends: exit code 0 and nothing it printed lost."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_a_finished_rank_exits_0_with_its_output_flushed(tmp_path):
    script = (
        "import atexit, logging, sys\n"
        "from parallel.distributed import exit_finished_rank\n"
        "atexit.register(lambda: print('atexit ran'))\n"
        "logging.basicConfig(filename=sys.argv[1], level=logging.INFO)\n"
        "logging.info('logged line')\n"
        "print('last line', end='')\n"
        "sys.stderr.write('err line')\n"
        "exit_finished_rank()\n"
        "print('never')\n"
    )
    log = tmp_path / "log.txt"
    proc = subprocess.run(
        [sys.executable, "-c", script, str(log)], cwd=ROOT, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "last line"  # flushed; no interpreter teardown (atexit) after it
    assert proc.stderr.endswith("err line")
    assert "logged line" in log.read_text()
