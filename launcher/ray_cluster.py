"""Helpers for scripts that build a Ray cluster by hand (the Slurm wrapper).

    python -m launcher.ray_cluster wait --address HOST:PORT --nodes N [--timeout S]

waits until the head answers and N nodes are alive, so that the job starts only when every
allocated node can take training workers (Ray would otherwise place them on the nodes that
happened to be up, or wait without saying why).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import time


def alive_nodes(address: str) -> int:
    import ray

    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    try:
        return sum(1 for node in ray.nodes() if node.get("Alive"))
    finally:
        ray.shutdown()


def _port_open(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1.0):
            return True
    except OSError:
        return False


def _alive(pid: int | None) -> bool:
    if pid is None:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def wait_for_nodes(
    address: str, nodes: int, timeout_s: float, poll_s: float = 1.0, pid: int | None = None
) -> int:
    """Block until `nodes` Ray nodes are alive; returns the count.

    Raises TimeoutError, or RuntimeError as soon as process `pid` (the head's launcher) is gone:
    a head that failed to start must not cost the whole timeout. Ray is only asked once the
    GCS port accepts connections, because `ray.init` on a dead address blocks for a minute.
    """
    deadline = time.monotonic() + timeout_s
    seen, error = 0, ""
    while True:
        if not _alive(pid):
            raise RuntimeError(f"the Ray head process {pid} exited; see its messages above")
        try:
            if _port_open(address):
                seen = alive_nodes(address)
                error = ""
            else:
                error = " (the head's port is not open yet)"
        except Exception as exc:  # head not up yet: keep trying until the deadline
            error = f" ({type(exc).__name__}: {exc})"
        if seen >= nodes:
            return seen
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"only {seen} of {nodes} Ray node(s) joined {address} in {timeout_s:g} s{error}"
            )
        time.sleep(poll_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.ray_cluster", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    wait = sub.add_parser("wait", help="wait until N nodes have joined")
    wait.add_argument("--address", required=True)
    wait.add_argument("--nodes", type=int, required=True)
    wait.add_argument("--timeout", type=float, default=300.0)
    wait.add_argument("--quiet", action="store_true", help="no success line")
    wait.add_argument("--pid", type=int, default=None, help="fail when this process exits")
    args = parser.parse_args(argv)
    try:
        seen = wait_for_nodes(args.address, args.nodes, args.timeout, pid=args.pid)
    except (TimeoutError, RuntimeError) as exc:
        print(f"ray_cluster: error: {exc}", file=sys.stderr, flush=True)
        return 1
    if not args.quiet:
        print(f"ray_cluster: {seen}/{args.nodes} Ray node(s) joined {args.address}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
