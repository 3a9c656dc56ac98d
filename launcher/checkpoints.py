"""Crash-safe checkpoint directories: stage, mark complete, rename, then move the pointer.

A checkpoint becomes visible only by an atomic rename of a fully written directory, and the
`latest` pointer is replaced atomically after that. A crash at any point leaves the previous
checkpoint loadable; a stale staging area is simply discarded on the next save.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

COMPLETE = "polyshift_complete.json"
_TAG = re.compile(r"^step_(\d{8})$")


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class CheckpointStore:
    def __init__(self, root: Path, keep_last: int) -> None:
        self.root = Path(root)
        self.staging = self.root / ".staging"
        self.keep_last = keep_last

    def complete_tags(self) -> list[str]:
        if not self.root.is_dir():
            return []
        tags = [
            p.name for p in self.root.iterdir() if _TAG.match(p.name) and (p / COMPLETE).is_file()
        ]
        return sorted(tags)

    def latest(self) -> str | None:
        """The newest complete checkpoint. The `latest` pointer file is kept for DeepSpeed's
        tools (zero_to_fp32); completeness markers are what resume trusts."""
        tags = self.complete_tags()
        return tags[-1] if tags else None

    def discard_leftovers(self) -> list[Path]:
        """Rank 0, at start-up: what an interrupted save or commit left behind (the staging
        area, half-written pointer and marker files) is removed; complete checkpoints stay."""
        if not self.root.is_dir():
            return []
        found = [self.staging] if self.staging.exists() else []
        found += [p for p in self.root.glob("latest.tmp*") if p.is_file()]
        found += [p for p in self.root.glob(f"step_*/{COMPLETE}.tmp*") if p.is_file()]
        for path in found:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        return found

    def prepare(self) -> Path:
        """Rank 0, before every rank writes into the staging root."""
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True)
        return self.staging

    def commit(self, tag: str, info: dict) -> Path:
        """Rank 0, after every rank finished writing `staging/tag`."""
        staged = self.staging / tag
        _write_atomic(staged / COMPLETE, json.dumps({**info, "time": time.time()}, indent=2))
        final = self.root / tag
        if final.exists():  # an earlier attempt at the same step (restarted job)
            shutil.rmtree(final)
        os.replace(staged, final)
        _write_atomic(self.root / "latest", tag + "\n")
        shutil.rmtree(self.staging, ignore_errors=True)
        for old in self.complete_tags()[: -self.keep_last]:
            shutil.rmtree(self.root / old, ignore_errors=True)
        return final
