"""Pre-flight check of what `ray job submit --working-dir DIR` would upload.

Ray zips the working directory in memory and only then finds out that it is over the size the
cluster accepts (the GCS limit, 512 MiB, `RAY_max_grpc_message_size`); with a stray checkpoint
or model in the tree that means minutes of zipping and then an error, or a slow upload on every
submission. This walks the directory with Ray's own exclusion rules (its default excludes,
`.gitignore` and `.rayignore` in every folder, and runtime_env `excludes`) and fails before any
upload when the files that would be shipped add up to more than the limit.

    python -m launcher.ray_package [DIR] [--exclude PATTERN ...] [--limit-mib N]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

LIMIT_ENV = "POLYSHIFT_MAX_UPLOAD_MIB"
MIB = 1024 * 1024


class PackageTooLarge(ValueError):
    """The working directory would exceed the upload limit."""


@dataclass
class PackageSize:
    root: Path
    files: int = 0
    bytes: int = 0
    largest: list[tuple[int, str]] = field(default_factory=list)  # (size, relative path)

    def describe(self) -> str:
        return f"{self.root}: {self.files} files, {self.bytes / MIB:.1f} MiB"


def default_limit() -> int:
    """Ray's own hard limit (bytes) unless POLYSHIFT_MAX_UPLOAD_MIB sets a smaller policy."""
    if os.environ.get(LIMIT_ENV):
        return int(float(os.environ[LIMIT_ENV]) * MIB)
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE

    return GCS_STORAGE_MAX_SIZE


def measure(directory: str | Path, excludes: list[str] | None = None) -> PackageSize:
    """Size of the files Ray would put into the working-dir package (before compression)."""
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    root = Path(directory).resolve()
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a directory")
    patterns = ray_constants.get_runtime_env_default_excludes() + list(excludes or [])
    include_gitignore = os.environ.get(ray_constants.RAY_RUNTIME_ENV_IGNORE_GITIGNORE, "0") != "1"
    result = PackageSize(root)

    def handler(path: Path) -> None:
        if path.is_file() and not path.is_symlink():
            size = path.stat().st_size  # the apparent size: that is what gets read and zipped
            result.files += 1
            result.bytes += size
            result.largest.append((size, str(path.relative_to(root))))
            result.largest = sorted(result.largest, reverse=True)[:5]

    quiet = logging.getLogger("polyshift.ray_package")  # Ray logs every ignore file it reads
    quiet.setLevel(logging.WARNING)
    excluded = [_get_excludes(root, patterns)]
    _dir_travel(root, excluded, handler, include_gitignore=include_gitignore, logger=quiet)
    return result


def check_working_dir(
    directory: str | Path, excludes: list[str] | None = None, limit: int | None = None
) -> PackageSize:
    """Raise PackageTooLarge, naming the largest files, when the package would be over `limit`."""
    limit = default_limit() if limit is None else limit
    size = measure(directory, excludes)
    if size.bytes > limit:
        biggest = "\n".join(f"  {s / MIB:10.1f} MiB  {p}" for s, p in size.largest)
        raise PackageTooLarge(
            f"the Ray working directory {size.root} would upload {size.bytes / MIB:.1f} MiB "
            f"in {size.files} files, over the limit of {limit / MIB:.0f} MiB "
            f"(Ray's GCS package limit, or {LIMIT_ENV}). Largest files:\n{biggest}\n"
            "Exclude them in .rayignore (or .gitignore), or keep data, models and run outputs "
            "outside the working directory and refer to them by absolute path."
        )
    return size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.ray_package", description=__doc__)
    parser.add_argument("directory", nargs="?", default=".")
    parser.add_argument("--exclude", action="append", default=[], help="gitwildmatch pattern")
    parser.add_argument("--limit-mib", type=float, default=None)
    args = parser.parse_args(argv)
    limit = None if args.limit_mib is None else int(args.limit_mib * MIB)
    try:
        size = check_working_dir(args.directory, args.exclude, limit)
    except (PackageTooLarge, NotADirectoryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"ray working dir ok: {size.describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
