"""A real MLflow server on loopback for the tests, and stopping it with everything it forked."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

_handed_out: set[int] = set()


def service_port(host: str = "127.0.0.1") -> int:
    """A free port for a server that another process binds later, below the kernel's
    ephemeral range and above Ray's worker ports (10002-19999).

    A port from bind(0) is ephemeral: until the server binds it, the kernel may hand it to any
    process's outgoing connection or bind(0) (seen: a Ray head's client server lost its port to
    one and the Slurm job waited out its timeout)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()  # not the tests' seeded global state
    for _ in range(200):
        port = rng.randrange(20000, max(low, 20001))
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in 20000-{low}")


def start_mlflow(root: Path) -> tuple[subprocess.Popen, str]:
    """Start `mlflow server` over a sqlite store under `root`; returns (process, URI) at once."""
    root.mkdir(parents=True, exist_ok=True)
    port = service_port()
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
