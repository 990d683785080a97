"""User-facing errors.

Every problem a user can fix (a missing dataset, a config typo, a corrupt checkpoint, a
missing optional package) is raised as :class:`SmopeError` with a message that names the
problem and the fix. The CLI prints the message alone and exits non-zero; library users
catch it like any other exception.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable
from pathlib import Path


class SmopeError(Exception):
    """A problem the user can fix; the message says how."""


class ConfigAdviceError(SmopeError):
    """A problem whose fix changes the configuration (a learning rate, the weights' source).

    A run adds to the message how to apply such a change to its ``output_dir``, which keeps
    the configuration of its finished tasks.
    """


class InvalidSettingError(SmopeError, ValueError):
    """An invalid adapter setting; also a ``ValueError`` for library code that catches those."""


class MissingExtraError(SmopeError, ImportError):
    """An optional package is not installed."""

    def __init__(self, package: str, extra: str, purpose: str) -> None:
        super().__init__(
            f"{purpose} needs the package '{package}', which is not installed. "
            f"Install it with: pip install 'smope[{extra}]'  (or: pip install {package})"
        )


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` says "no space left on device" (or "disk quota exceeded"), also as the Rust I/O
    error safetensors raises, whose text ends in "(os error 28)"."""
    codes = (errno.ENOSPC, errno.EDQUOT)
    if isinstance(exc, OSError):
        return exc.errno in codes
    return any(f"(os error {code})" in str(exc) for code in codes)


class DiskFullError(SmopeError):
    """The disk filled up while writing; the message names the folder to free space in."""

    def __init__(self, exc: OSError, folder: str | Path, then: str = "run the same command again") -> None:
        written = Path(exc.filename) if exc.filename else Path(folder)
        where = written.parent if exc.filename else written
        super().__init__(f"no space left on device while writing {written} ({exc.strerror or exc}): free space in {where}, then {then}")


def one_line(exc: SmopeError) -> str:
    """The message of ``exc``; raised in a DataLoader worker, torch re-raises it with the worker's traceback prepended."""
    text = str(exc)
    if "\nOriginal Traceback" in text:
        text = text.rstrip().splitlines()[-1].split(": ", 1)[-1]
    return text


def exit_on_user_error(main: Callable[[], object]) -> None:
    """Run ``main``; a :class:`SmopeError` becomes one ``error: ...`` line on stderr and exit status 2 (CLI and scripts)."""
    try:
        try:
            main()
        except OSError as exc:
            if not disk_full(exc):
                raise
            raise DiskFullError(exc, Path.cwd()) from exc
    except SmopeError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        raise SystemExit(2) from None
