"""One job per run directory: an advisory lock held by the job's rank-0 (or driver) process.

Two jobs in one directory would overwrite each other's checkpoints and staging area. The lock
is a ``flock`` on ``<run dir>/.polyshift.lock``: the kernel releases it when the holder dies,
so a stale lock never blocks a restart; the file also records who held it, for the message.
(``flock`` is per host on some network file systems: two hosts sharing one run directory over
NFS are not guarded.)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from config.errors import UserError

LOCK_FILE = ".polyshift.lock"


class RunDirInUse(UserError):
    """Another job holds the run directory."""


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"]))
        return f"pid {info['pid']} on {info['host']} (since {started})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextlib.contextmanager
def run_dir_lock(run_dir: Path) -> Iterator[None]:
    path = Path(run_dir) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirInUse(
                f"{run_dir} is in use by {_holder(path)}: wait for that job, stop it, or give "
                "this run another name"
            ) from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        yield
    finally:
        os.close(fd)  # closing releases the flock
