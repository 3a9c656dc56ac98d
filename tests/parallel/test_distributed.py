"""The process group's lifetime: a finished run tears down what it set up, and nothing else."""

from __future__ import annotations

import torch.distributed as dist

from parallel.distributed import free_port, init_distributed, shutdown_distributed


def test_shutdown_destroys_the_group_init_created_and_no_other(monkeypatch):
    assert not dist.is_initialized(), "a test before this one left a process group behind"
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    init_distributed("cpu")
    assert dist.is_initialized() and dist.get_backend() == "gloo"
    shutdown_distributed()
    assert not dist.is_initialized()
    shutdown_distributed()  # twice is harmless

    # A group someone else created (Ray Train's, a caller's) is theirs to destroy.
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        shutdown_distributed()
        assert dist.is_initialized()
        init_distributed("cpu")  # joins the existing group: still not ours
        shutdown_distributed()
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()
