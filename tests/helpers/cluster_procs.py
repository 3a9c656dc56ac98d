"""Process helpers for the cluster tests: a private Ray head, and stopping exactly what we started.

Never `ray stop` (it kills every Ray process of the machine, other people's included): the head
runs as `ray start --block` in its own session, and teardown signals that process tree by pid.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from tests.helpers.runs import clean_env
from tests.helpers.servers import service_port

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = str(Path(sys.executable).parent)


# No idle default workers started ahead (one per CPU when the first driver connects): every
# worker the tests use has its own runtime env, so Ray starts fresh ones anyway and the idle
# ones only took CPU from the start-up.
RAY_NO_PRESTART = {"RAY_prestart_worker_first_driver": "0", "RAY_enable_worker_prestart": "0"}


def tool_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for CLI tools: the venv first on PATH, the repository importable."""
    env = {**clean_env(), **(extra or {})}
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(ROOT)
    return env


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _by_marker(marker: str) -> list[psutil.Process]:
    """Processes whose command line names `marker` (our private temp dir), and their children."""
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(marker in part for part in proc.info["cmdline"] or ()):
                for p in _tree(proc.pid):
                    found[p.pid] = p
    found.pop(os.getpid(), None)
    return list(found.values())


def stop_tree(pid: int, marker: str | None = None, grace_s: float = 10.0) -> None:
    """SIGTERM the tree under `pid` (and anything naming `marker`), SIGKILL what outlives it."""
    procs = {p.pid: p for p in _tree(pid)}
    if marker:
        procs.update({p.pid: p for p in _by_marker(marker)})
    for p in procs.values():
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(list(procs.values()), timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=5)


def leftovers(marker: str) -> list[int]:
    return [p.pid for p in _by_marker(marker)]


@dataclass
class RayHead:
    gcs_address: str  # 127.0.0.1:port, for drivers (RAY_ADDRESS)
    dashboard_url: str  # for `ray job submit --address`
    temp_dir: str
    env: dict[str, str]  # what every client of this cluster needs (auth token, PATH)
    proc: subprocess.Popen


@contextlib.contextmanager
def ray_head(num_cpus: int = 4, log: Path | None = None) -> Iterator[RayHead]:
    """A private single-node Ray cluster on loopback, stopped by pid on exit."""
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: unix socket paths are limited
    port, dash, agent, client = (service_port() for _ in range(4))
    env = tool_env(
        {
            "RAY_AUTH_MODE": "token",  # whatever ~/.ray/auth_token holds, we use our own token
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
            "RAY_USAGE_STATS_ENABLED": "0",
            **RAY_NO_PRESTART,
        }
    )
    cmd = [
        f"{VENV_BIN}/ray", "start", "--head", "--block",
        "--node-ip-address", "127.0.0.1", "--port", str(port),
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
        "--dashboard-agent-listen-port", str(agent), "--ray-client-server-port", str(client),
        "--num-cpus", str(num_cpus), "--temp-dir", temp_dir, "--disable-usage-stats",
    ]  # fmt: skip
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(
        cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        address = f"127.0.0.1:{port}"
        wait = subprocess.run(
            [sys.executable, "-m", "launcher.ray_cluster", "wait", "--address", address,
             "--nodes", "1", "--timeout", "90", "--pid", str(proc.pid)],
            env=env, capture_output=True, text=True, timeout=150,
        )  # fmt: skip
        if wait.returncode != 0:
            raise RuntimeError(f"the test Ray head did not start: {wait.stderr[-2000:]}")
        yield RayHead(address, f"http://127.0.0.1:{dash}", temp_dir, env, proc)
    finally:
        stop_tree(proc.pid, marker=temp_dir)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        if out is not subprocess.DEVNULL:
            out.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def wait_for(predicate, timeout_s: float, poll_s: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(poll_s)
