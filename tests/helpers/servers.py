"""A real MLflow server on loopback for the tests, and stopping it with everything it forked."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from parallel.distributed import free_port


def start_mlflow(root: Path) -> tuple[subprocess.Popen, str]:
    """Start `mlflow server` over a sqlite store under `root`; returns (process, URI) at once."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job-runner pool
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
        "--artifacts-destination", str(root / "artifacts"),
    ]  # fmt: skip
    with open(root / "server.log", "wb") as log:
        proc = subprocess.Popen(
            cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    return proc, f"http://127.0.0.1:{port}"


def wait_healthy(uri: str, timeout_s: float = 120, proc: subprocess.Popen | None = None,
                 log: Path | None = None) -> None:  # fmt: skip
    """Block until GET /health answers 200; fail early if the server process died."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(log.read_text()[-3000:] if log else "mlflow server exited")
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"mlflow server not healthy after {timeout_s:g} s")
        time.sleep(0.25)


def stop_group(proc: subprocess.Popen) -> None:
    """The server forks a uvicorn worker; only killing its whole session leaves nothing behind."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # whatever ignored SIGTERM or outlived the parent
    proc.wait(timeout=10)
