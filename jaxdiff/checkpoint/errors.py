"""The checkpoint module's errors, and the operating system's reason behind a failed write."""

from __future__ import annotations

import errno
import os
import pathlib

# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class CheckpointError(ValueError):
    """Base of every error of this module; a few lines naming the directory, the step and the
    fix (a ValueError, so that ``except ValueError`` keeps catching them)."""


class WorkdirLockedError(CheckpointError):
    """Another process holds the workdir's lock; ``holder`` is what it wrote into the lock
    file (``pid``, ``host``, ``since``, ``command``), or ``{}`` while it is still starting."""

    def __init__(self, message: str, *, path: pathlib.Path, holder: dict):
        super().__init__(message)
        self.path, self.holder = path, holder


class CorruptCheckpointError(CheckpointError):
    """The checkpoint of ``step`` at ``path`` cannot be read or fails its checksums;
    ``remaining`` lists the other complete steps (oldest first), ``reason`` says what is wrong."""

    def __init__(
        self, message: str, *, path: pathlib.Path, step: int, remaining: list[int], reason: str
    ):
        super().__init__(message)
        self.path, self.step, self.remaining, self.reason = path, step, remaining, reason


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written to ``path`` (``step``, or None when the directory
    itself could not be created); ``os_error`` is the operating system's message, if any."""

    def __init__(self, message: str, *, path: pathlib.Path, step: int | None, os_error: str):
        super().__init__(message)
        self.path, self.step, self.os_error = path, step, os_error


class NonFiniteStateError(CheckpointError):
    """The state of ``step`` holds a NaN or an infinity in ``leaf`` (first such leaf path);
    nothing was written."""

    def __init__(self, message: str, *, step: int, leaf: str):
        super().__init__(message)
        self.step, self.leaf = step, leaf


_OS_ERRORS = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EIO)


def _os_error(err: BaseException) -> str:
    """The operating system's message behind ``err`` (walking its causes), else its text."""
    seen, stack = set(), [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.strerror:
            return f"{e.strerror} (errno {errno.errorcode.get(e.errno, e.errno)})"
        text = str(e)
        for code in _OS_ERRORS:
            if os.strerror(code) in text:
                return f"{os.strerror(code)} (errno {errno.errorcode[code]})"
        stack.extend([e.__cause__, e.__context__, *getattr(e, "exceptions", ())])
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {first[:300]}"


def _write_error(
    directory: pathlib.Path, step: int | None, err: BaseException, *, what: str | None = None
) -> CheckpointWriteError:
    reason = _os_error(err)
    what = what or ("write checkpoints" if step is None else f"write the checkpoint of step {step}")
    return CheckpointWriteError(
        f"cannot {what} in {str(directory)!r}: {reason}.\n"
        "Free space there or make it writable, or pick another workdir; the checkpoints already "
        "there are untouched.",
        path=directory,
        step=step,
        os_error=reason,
    )
