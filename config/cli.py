"""The one error path of every command line: a user's mistake is one line on stderr and exit 2.

`run_cli(main)` wraps a CLI's ``main``: `UserError`, a bad file (undecodable text, invalid JSON
or YAML, a broken safetensors header, a schema error) and OS errors (missing file, permissions,
full disk) print ``error: <message>`` and return 2; Ctrl-C returns 130. Nothing else is caught:
a bug still shows its traceback. ``POLYSHIFT_TRACEBACK=1`` re-raises everything (debugging).
This module imports nothing heavy so that data/ and parallel/ CLIs may use it.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from config.errors import UserError

USER_ERROR_EXIT = 2

F = TypeVar("F", bound=Callable[..., int])


def describe_error(exc: BaseException) -> str | None:
    """The message for an error the user can fix, or None for one that is a bug."""
    if isinstance(exc, UserError):
        return str(exc)
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 text ({exc.reason} at byte {exc.start})"
    if isinstance(exc, json.JSONDecodeError):
        return f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
    if isinstance(exc, OSError):
        where = exc.filename if exc.filename is not None else None
        cause = exc.strerror or str(exc) or type(exc).__name__
        return f"{where}: {cause}" if where else cause
    name = type(exc).__name__
    module = type(exc).__module__ or ""
    if name == "SafetensorError" or module.startswith(("yaml", "pydantic", "jinja2")):
        return f"{name}: {exc}"
    if isinstance(exc, ValueError):  # what the libraries raise for a bad argument or file
        return str(exc) or name
    return None


def report(exc: BaseException) -> int:
    """Print a known error as the CLIs do; re-raise anything else."""
    message = describe_error(exc)
    if message is None:
        raise exc
    print(f"error: {message}", file=sys.stderr)
    return USER_ERROR_EXIT


def run_cli(main: F) -> F:
    """Decorate a CLI ``main(argv) -> int`` with the shared error path."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> int:
        try:
            return main(*args, **kwargs)
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            return 130
        except Exception as exc:
            if os.environ.get("POLYSHIFT_TRACEBACK", "0") not in ("0", ""):
                raise
            return report(exc)

    return wrapper  # type: ignore[return-value]


def bounded_int(low: int = 1, high: int = 10**9) -> Callable[[str], int]:
    """An argparse ``type`` for a count: an integer in [low, high], else a usage error."""
    import argparse

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}], got {value}")
        return value

    return parse
