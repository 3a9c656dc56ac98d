from __future__ import annotations

import _posixsubprocess
import contextlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.helpers.servers import start_mlflow, stop_group, wait_healthy
from tests.helpers.tiny import make_tiny_llama

# Tiny models run fastest on one thread, and the suite's processes share 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

# One ninja for every process the tests start, and a build directory of their own. DeepSpeed
# JIT-builds its CPU shared-memory op with whichever ninja comes first on PATH; Debian's ninja
# 1.11 and the venv's 1.13 hash .ninja_log entries differently, so each one takes the other's
# build for stale and rebuilds it (minutes on 2 busy cores), and jobs started through tool_env
# (venv first) alternated with those started by run_cli (system PATH).
os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))

# platform.processor() runs `uname -p` once per interpreter and caches it; libraries ask for it
# on first import (mlflow's telemetry): ask here, so no fast test starts that process.
platform.processor()

# Tests never reach a hub, and never write into the user's cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# matplotlib builds its font cache on first import, running `fc-list` in a subprocess: on a fresh
# machine that would happen inside whichever fast test plots first and trip the guard below.
# Build it here, once per session, before any test runs.
os.environ.setdefault("MPLBACKEND", "Agg")
with contextlib.suppress(ImportError):
    import matplotlib.font_manager  # noqa: F401


class ProcessInFastTest(RuntimeError):
    """A test without the `slow` marker tried to start a process."""


_SPAWNED: list[str] = []


def _refusing(name: str, real):
    def refuse(*args, **kwargs):
        _SPAWNED.append(name)
        raise ProcessInFastTest(f"{name}: this test starts a process; mark it @pytest.mark.slow")

    refuse.real = real
    return refuse


@contextlib.contextmanager
def _no_process_starts() -> Iterator[None]:
    targets = [(subprocess, "_fork_exec"), (_posixsubprocess, "fork_exec"), (os, "fork"),
               (os, "posix_spawn"), (os, "posix_spawnp")]  # fmt: skip
    saved = [(mod, attr, getattr(mod, attr)) for mod, attr in targets if hasattr(mod, attr)]
    _SPAWNED.clear()
    for mod, attr, real in saved:
        setattr(mod, attr, _refusing(f"{mod.__name__}.{attr}", real))
    try:
        yield
    finally:
        for mod, attr, real in saved:
            setattr(mod, attr, real)


def _cpu_s() -> float:
    own, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


@contextlib.contextmanager
def _cpu_logged(nodeid: str, log: str) -> Iterator[None]:
    wall, cpu = time.monotonic(), _cpu_s()
    try:
        yield
    finally:
        row = {"test": nodeid, "wall_s": round(time.monotonic() - wall, 2),
               "cpu_s": round(_cpu_s() - cpu, 2)}  # fmt: skip
        with open(log, "a") as fh:
            fh.write(json.dumps(row) + "\n")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    """`make test-fast` must stay fast: a test not marked slow may start no process (subprocess,
    multiprocessing, fork), from its set-up and fixtures through its teardown.

    POLYSHIFT_TEST_CPU_LOG=FILE: one JSON line per test with its wall and CPU seconds (its own
    and its finished child processes'), a measure that other load on the machine barely moves."""
    with contextlib.ExitStack() as stack:
        if not item.get_closest_marker("slow"):
            stack.enter_context(_no_process_starts())
        if log := os.environ.get("POLYSHIFT_TEST_CPU_LOG"):
            stack.enter_context(_cpu_logged(item.nodeid, log))
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Fail the test even when library code swallowed the refusal."""
    report = yield
    if call.when == "teardown" and _SPAWNED and not item.get_closest_marker("slow"):
        report.outcome = "failed"
        report.longrepr = f"{item.nodeid} started a process ({', '.join(sorted(set(_SPAWNED)))}) "
        report.longrepr += "without @pytest.mark.slow"
        _SPAWNED.clear()
    return report


@pytest.fixture(scope="session")
def mlflow_server(request, tmp_path_factory) -> Iterator[str]:
    """A real MLflow server on 127.0.0.1 for the whole session, stopped (with its workers) after.
    Under xdist every worker uses the one server the controller started."""
    shared = getattr(request.config, "workerinput", {}).get("mlflow_uri")
    if shared:
        wait_healthy(shared)
        yield shared
        return
    root = tmp_path_factory.mktemp("mlflow_server")
    proc, uri = start_mlflow(root)
    try:
        wait_healthy(uri, proc=proc, log=root / "server.log")
        yield uri
    finally:
        stop_group(proc)


# The modules that take longest (their processes, clusters and servers), longest first. `make
# test` hands whole files to 2 xdist workers in collection order (--dist loadfile
# --no-loadscope-reorder): starting with these keeps both workers busy to the end.
LONGEST_FIRST = (  # seconds: summed test wall time of `make test` on a busy machine (2026-12-02)
    # unless marked "alone": the file by itself, nice 15, on the busy 2-core machine (2026-12-03)
    "tests/cluster/test_ray_launch.py",  # 765 s; alone 300-307 s
    "tests/launcher/test_training.py",  # 980 s; alone 269 s (before two launches went)
    "tests/methods/shifcon/test_method.py",  # 390 s
    "tests/launcher/test_lora_training.py",  # 200 s; alone 232 s
    "tests/cluster/test_slurm.py",  # 260 s; alone 207 s
    "tests/parallel/test_megatron.py",  # 200 s
    "tests/parallel/test_megatron_layouts.py",
    "tests/parallel/test_megatron_lens.py",  # new, not timed: megatron worker pairs
    "tests/parallel/test_megatron_exit.py",
    "tests/methods/test_lens.py",
    "tests/eval/test_engine.py",
    "tests/methods/shifcon/test_probe.py",
    "tests/eval/test_eval.py",
    "tests/launcher/test_xtransplant.py",
)


def pytest_collection_modifyitems(config, items) -> None:
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))


class _SharedMlflow:
    """xdist controller side: one server for all workers, started before they collect (its
    start-up overlaps theirs) and stopped after they are done."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="polyshift-mlflow-"))
        self.proc, self.uri = start_mlflow(self.root)

    def pytest_configure_node(self, node) -> None:
        node.workerinput["mlflow_uri"] = self.uri

    def pytest_unconfigure(self, config) -> None:
        stop_group(self.proc)
        shutil.rmtree(self.root, ignore_errors=True)


def pytest_configure(config) -> None:
    controller = not hasattr(config, "workerinput")
    if controller and config.pluginmanager.hasplugin("xdist") and config.getoption("numprocesses"):
        config.pluginmanager.register(_SharedMlflow(), "polyshift-shared-mlflow")


@pytest.fixture(autouse=True)
def _restore_environment():
    """In-process distributed code exports RANK & co.; later tests (and the clusters and jobs
    they start) must not inherit them."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")
