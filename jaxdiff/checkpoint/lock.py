"""One writer per workdir: an ``flock`` that the kernel drops when its holder dies."""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import pathlib
import shlex
import socket
import sys

from jaxdiff.checkpoint.errors import CheckpointError, WorkdirLockedError, _write_error

LOCK_FILE = "jaxdiff.lock"

# --------------------------------------------------------------------------------------------
# One writer per workdir
# --------------------------------------------------------------------------------------------


def _utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


class WorkdirLock:
    """An exclusive lock on a workdir, held by the one process that writes it.

    ``flock`` on ``<workdir>/jaxdiff.lock``: the kernel drops the lock when the holder exits,
    however it exits (a SIGKILL included), so a stale lock never blocks the next run. The holder
    writes its pid, host, start time and command line into the file, so that a refused process
    can name it. Acquire once per run, on process 0 only::

        with checkpoint.WorkdirLock(workdir):
            ...  # train; a second process on the same workdir gets WorkdirLockedError

    ``acquire`` raises :class:`WorkdirLockedError` at once when another holder (another process,
    or another WorkdirLock object) has the lock, and :class:`CheckpointWriteError` when the lock
    file cannot be written (a read-only workdir, a file system without locks).
    """

    def __init__(self, workdir: str | os.PathLike):
        self.workdir = pathlib.Path(workdir).absolute()
        self.path = self.workdir / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def acquire(self) -> WorkdirLock:
        if self._fd is not None:
            raise CheckpointError(f"this WorkdirLock already holds {str(self.path)!r}")
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise _write_error(self.workdir, None, err, what="write the lock file") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _read_holder(fd)
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise WorkdirLockedError(
                    _locked_message(self.workdir, holder), path=self.path, holder=holder
                ) from None
            raise _write_error(self.workdir, None, err, what="write the lock file") from err
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": _utc_now(),
            "command": shlex.join(sys.argv) if sys.argv and sys.argv[0] else sys.executable,
        }
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        except OSError as err:
            os.close(fd)
            raise _write_error(self.workdir, None, err, what="write the lock file") from err
        self._fd = fd
        return self

    def release(self) -> None:
        """Release the lock (a no-op when not held). The file stays, emptied."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing the last descriptor drops the flock

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> dict:
    try:
        holder = json.loads(os.pread(fd, 65536, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _locked_message(workdir: pathlib.Path, holder: dict) -> str:
    if not holder:
        who = "another process (it is starting and has not written its name yet)"
    else:
        who = (
            f"process {holder.get('pid')} on host {holder.get('host')!r} since "
            f"{holder.get('since')} (command: {holder.get('command')})"
        )
        pid = holder.get("pid")
        if holder.get("host") == socket.gethostname() and isinstance(pid, int):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                who += f"; pid {pid} has exited, so a process it started still holds the lock"
            except OSError:
                pass
    return (
        f"workdir {str(workdir)!r} is in use: it is locked by {who}.\n"
        "Wait for that run to end or stop it, or use another workdir; nothing was written."
    )
