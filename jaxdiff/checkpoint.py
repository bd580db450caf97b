"""Checkpoints of the training state: the only code that reads or writes it (Orbax).

A workdir keeps its checkpoints in ``<workdir>/checkpoints/<step>/``, each with three items:
``state`` (the :class:`jaxdiff.train.TrainState` pytree), ``config`` (the run's configuration
and its SHA-256 fingerprint) and ``integrity`` (the SHA-256 of every array's bytes, with its
shape and dtype). Orbax writes every step into a temporary directory and renames it when
complete, so a crash never leaves a half-written step that looks finished.

Guarantees:

* nothing is ever overwritten: a step that exists is not saved again, and a workdir whose
  checkpoints were written with another configuration refuses both saving and restoring with a
  :class:`CheckpointError` naming the keys that differ;
* only Orbax's keep-the-newest-K policy deletes checkpoints, and only after a newer one is
  complete; an error never deletes anything;
* a state holding a NaN or an infinity is never saved (:class:`NonFiniteStateError`), so the
  keep-K rotation cannot push the newest finite checkpoint out;
* a checkpoint that cannot be read, or whose arrays differ from the checksums written with them,
  raises :class:`CorruptCheckpointError` naming the step, the reason and the steps that remain;
* a failed write (read-only or full disk, an Orbax error, also one from a background save) raises
  one :class:`CheckpointWriteError` at the next save, wait or close, without Orbax's log flood;
* restoring places every array on the sharding of ``like`` (or replicated over ``mesh``),
  whatever the number of devices that wrote it;
* one process writes a workdir: :class:`WorkdirLock` refuses a second one at once, naming the
  holder (the operating system drops the lock when its holder dies, however it dies).

Across processes (``jax.distributed``) every process constructs :class:`Checkpoints` and calls
``save``/``restore`` with the same arguments; Orbax coordinates the files, and only process 0
should hold the :class:`WorkdirLock`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import hashlib
import json
import logging
import os
import pathlib
import shlex
import shutil
import socket
import sys
import threading
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "CheckpointError",
    "CheckpointWriteError",
    "Checkpoints",
    "CorruptCheckpointError",
    "NonFiniteStateError",
    "WorkdirLock",
    "WorkdirLockedError",
    "all_steps",
    "checkpoint_dir",
    "config_diff",
    "config_fingerprint",
    "latest_step",
    "restore",
    "save",
]

_SUBDIR = "checkpoints"
LOCK_FILE = "jaxdiff.lock"
_INTEGRITY_FORMAT = 1


def checkpoint_dir(workdir: str | os.PathLike) -> pathlib.Path:
    """Where a workdir keeps its checkpoints: ``<workdir>/checkpoints``."""
    return pathlib.Path(workdir).absolute() / _SUBDIR


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


# --------------------------------------------------------------------------------------------
# One writer per workdir
# --------------------------------------------------------------------------------------------


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


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


# --------------------------------------------------------------------------------------------
# Configuration fingerprints
# --------------------------------------------------------------------------------------------


def _canonical(config: Any) -> dict:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    if not isinstance(config, Mapping):
        raise ValueError(f"config must be a mapping or a dataclass, got {type(config).__name__}")
    # A JSON round trip makes tuples lists and keys strings, as they come back from disk.
    return json.loads(json.dumps(config, sort_keys=True, default=str))


def config_fingerprint(config: Mapping | Any) -> str:
    """SHA-256 of the configuration's canonical JSON (sorted keys, tuples as lists)."""
    text = json.dumps(_canonical(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def config_diff(saved: Mapping, current: Mapping) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (saved value, current value)}`` for every key that differs.

    A key present on one side only shows ``<absent>`` on the other.
    """
    a, b = _flatten(_canonical(saved)), _flatten(_canonical(current))
    missing = "<absent>"
    return {
        key: (a.get(key, missing), b.get(key, missing))
        for key in sorted(set(a) | set(b))
        if a.get(key, missing) != b.get(key, missing)
    }


# --------------------------------------------------------------------------------------------
# Host copies, checksums and the finite check
# --------------------------------------------------------------------------------------------


def _host_leaves(tree: Any) -> list[tuple[str, np.ndarray]]:
    """``(keystr path, host array)`` of every leaf. A typed PRNG key becomes its key data; an
    array split over several processes is gathered (a collective: every process calls this)."""
    paths, leaves = [], []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            if leaf.sharding.is_fully_replicated:
                leaf = leaf.addressable_shards[0].data
            else:
                leaf = multihost_utils.process_allgather(leaf, tiled=True)
        paths.append(jax.tree_util.keystr(path))
        leaves.append(leaf)
    return list(zip(paths, (np.asarray(x) for x in jax.device_get(leaves)), strict=True))


def _digest(value: np.ndarray) -> str:
    flat = np.ascontiguousarray(value).reshape(-1)
    return hashlib.sha256(flat.view(np.uint8).data).hexdigest()


def _integrity_record(step: int, host: list[tuple[str, np.ndarray]]) -> dict:
    return {
        "format": _INTEGRITY_FORMAT,
        "algorithm": "sha256",
        "step": step,
        "leaves": {
            path: {"shape": list(value.shape), "dtype": str(value.dtype), "sha256": _digest(value)}
            for path, value in host
        },
    }


def _first_nonfinite(host: list[tuple[str, np.ndarray]]) -> str | None:
    for path, value in host:
        if jnp.issubdtype(value.dtype, jnp.inexact) and not np.isfinite(value).all():
            return path
    return None


def _verify(state: Any, record: dict) -> str | None:
    """The reason the restored ``state`` fails ``record``'s checksums, or None. Leaves restored
    into another shape or dtype than they were saved with (a cast on restore) are not checked."""
    leaves = record.get("leaves", {})
    for path, value in _host_leaves(state):
        expected = leaves.get(path)
        if expected is None:
            continue
        if list(value.shape) != expected["shape"] or str(value.dtype) != expected["dtype"]:
            continue
        if _digest(value) != expected["sha256"]:
            return (
                f"the array {path} (shape {tuple(value.shape)}, {value.dtype}) differs from the "
                "checksum written with it"
            )
    return None


# --------------------------------------------------------------------------------------------
# Orbax plumbing: quiet logs, clear errors
# --------------------------------------------------------------------------------------------

_ORBAX_PARTS = (f"{os.sep}orbax{os.sep}", f"{os.sep}tensorstore{os.sep}")


class _QuietOrbax(logging.Filter):
    """Drops the records Orbax logs through absl (its background threads log every failure
    with a traceback, which this module raises once, as a clear error, instead), and asyncio's
    "exception was never retrieved" reports of Orbax's failed tasks."""

    def filter(self, record: logging.LogRecord) -> bool:
        if any(part in record.pathname for part in _ORBAX_PARTS):
            return False
        if record.name == "asyncio" and record.exc_info and record.exc_info[2] is not None:
            tb = record.exc_info[2]
            while tb is not None:
                if any(part in tb.tb_frame.f_code.co_filename for part in _ORBAX_PARTS):
                    return False
                tb = tb.tb_next
        return True


_QUIET = _QuietOrbax()
_QUIET_LOCK = threading.Lock()
_QUIET_LOGGERS = ("absl", "asyncio")


def _late_callback(args: Any) -> bool:
    """Whether an unraisable exception is a tensorstore write that completed after Orbax closed
    the event loop of a failed save (its callback finds the loop closed)."""
    tb = args.exc_traceback
    return (
        args.object is None
        and isinstance(args.exc_value, RuntimeError)
        and str(args.exc_value) == "Event loop is closed"
        and tb is not None
        and tb.tb_frame.f_code.co_name == "call_soon_threadsafe"
    )


def _unraisable_hook(args: Any) -> None:
    if not _late_callback(args):
        _previous_unraisable_hook(args)


_previous_unraisable_hook = sys.unraisablehook


def _quiet_orbax() -> None:
    """Silence Orbax's failure reports (once, for the rest of the process: its background
    threads may report a failure after the call that raised it returned, even after ``close``)."""
    global _previous_unraisable_hook
    with _QUIET_LOCK:
        for name in _QUIET_LOGGERS:
            logger = logging.getLogger(name)
            if _QUIET not in logger.filters:
                logger.addFilter(_QUIET)
        if sys.unraisablehook is not _unraisable_hook:
            _previous_unraisable_hook = sys.unraisablehook
            sys.unraisablehook = _unraisable_hook


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


def _manager(directory: pathlib.Path, **options) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(**options),
        item_names=("state", "config", "integrity"),
    )


def _reader(directory: pathlib.Path) -> ocp.CheckpointManager:
    # Not Orbax's read_only=True: that option only makes a manager skip saves, yet logs "Given
    # directory is read only" each time. This manager creates nothing, writes no root metadata
    # (so it meets no barrier of its own across processes), and is never asked to save.
    return _manager(directory, create=False, save_root_metadata=False, save_interval_steps=0)


def _corrupt(
    directory: pathlib.Path, step: int, steps: list[int], reason: str
) -> CorruptCheckpointError:
    others = [s for s in steps if s != step]
    path = directory / str(step)
    if others:
        fix = (
            f"steps {others} remain: restore one of them with step=N, or move that directory "
            f"away to resume from step {max(others)}"
        )
    else:
        fix = "no other step remains: move that directory away and start the run again"
    return CorruptCheckpointError(
        f"the checkpoint of step {step}, {str(path)!r}, is corrupt: {reason}.\n"
        f"{fix}. Nothing was deleted.",
        path=path,
        step=step,
        remaining=others,
        reason=reason,
    )


def _unreadable(err: Exception) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"it cannot be read ({type(err).__name__}: {text[:300]})"


def _saved_config(manager: ocp.CheckpointManager, directory: pathlib.Path, step: int) -> Any:
    steps = sorted(manager.all_steps())
    try:
        record = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        record = record.config
    except Exception as err:  # orbax raises many kinds on damaged files
        raise _corrupt(directory, step, steps, _unreadable(err)) from err
    if record is not None and not (isinstance(record, dict) and "config" in record):
        raise _corrupt(
            directory, step, steps, f"its config item is not a jaxdiff record: {record!r}"
        )
    return None if record is None else record["config"]


def _check_config(
    manager: ocp.CheckpointManager, directory: pathlib.Path, step: int, config: Any
) -> None:
    if config is None:
        return
    saved = _saved_config(manager, directory, step)
    if saved is None:
        return
    diff = config_diff(saved, config)
    if diff:
        listed = "; ".join(
            f"{k}: {old!r} in the checkpoint, {new!r} now" for k, (old, new) in diff.items()
        )
        raise CheckpointError(
            f"{str(directory)!r} holds checkpoints written with another configuration (step "
            f"{step}); differing keys: {listed}. Use another workdir, or run with the "
            "checkpoint's configuration. Nothing was written."
        )


def _target(like: Any, mesh: Mesh | None) -> Any:
    replicated = None if mesh is None else NamedSharding(mesh, P())

    def one(x):
        sharding = replicated or getattr(x, "sharding", None)
        if sharding is None:
            sharding = SingleDeviceSharding(jax.devices()[0])
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)

    return jax.tree.map(one, like)


def _remove_temporary(directory: pathlib.Path, step: int) -> None:
    """Remove what a failed save of ``step`` left (Orbax's ``<step>.orbax-checkpoint-tmp-*``),
    best effort and on process 0 only: it is not a checkpoint, and it may fill the disk."""
    if jax.process_index() != 0:
        return
    for path in directory.glob(f"{step}.orbax-checkpoint-tmp*"):
        shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


class Checkpoints:
    """Save a run's state every ``save_every`` steps into a workdir, keeping the newest ``keep``.

    Opening checks the workdir: if its newest checkpoint was written with a configuration
    other than ``config``, a :class:`CheckpointError` names the differing keys and nothing is
    written (checkpoints saved with ``config=None``, and opening with ``config=None``, skip the
    check). Pass the configuration that defines the run (model, diffusion, data, optimiser), not
    what may change on resumption (total steps, logging).

    Every process of a multi-process run opens it the same way and takes the same path (there is
    no branch on what exists on disk before Orbax's own directory barrier).

    Use as a context manager (or call :meth:`close`), so that asynchronous writes finish::

        with Checkpoints(workdir, config=cfg, save_every=1000, keep=3) as ckpt:
            if ckpt.latest_step() is not None:
                state = ckpt.restore(like=state)
            for batch in ...:
                state, metrics = train_step(state, batch)
                ckpt.save(state)

    Raises:
      CheckpointWriteError: the checkpoint directory cannot be created; from ``save``,
        ``wait`` or ``close``: a write failed (also an asynchronous one started earlier).
      NonFiniteStateError: from ``save``: the state holds a NaN or an infinity.
      CorruptCheckpointError: the newest checkpoint's config cannot be read; from ``restore``:
        the checkpoint is unreadable or fails its checksums.
      CheckpointError: another configuration; a bad argument (also a plain ValueError).
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        config: Mapping | Any | None = None,
        save_every: int = 1000,
        keep: int | None = 3,
        async_save: bool = True,
    ):
        if not isinstance(save_every, int) or save_every < 1:
            raise ValueError(f"save_every must be an int >= 1, got {save_every!r}")
        if keep is not None and (not isinstance(keep, int) or keep < 1):
            raise ValueError(f"keep must be an int >= 1 or None (keep all), got {keep!r}")
        self.directory = checkpoint_dir(workdir)
        self.save_every = save_every
        self.config = None if config is None else _canonical(config)
        self._pending: int | None = None  # the step of a save that may still be running
        self._closed = False
        _quiet_orbax()
        try:
            # One path for every process: process 0 creates the directory, all meet at
            # Orbax's barrier, then each reads the same listing.
            self._manager = _manager(
                self.directory,
                max_to_keep=keep,
                save_interval_steps=1,
                enable_async_checkpointing=async_save,
                # A step directory that cannot be created fails in save(), not in a thread
                # that others would wait on for minutes.
                async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
            )
        except OSError as err:
            raise _write_error(self.directory, None, err) from err
        try:
            steps = self.all_steps()
            if steps:
                _check_config(self._manager, self.directory, steps[-1], self.config)
        except BaseException:
            self._manager.close()
            raise

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def save(self, state: Any, *, force: bool = False) -> bool:
        """Save ``state`` if its step is a multiple of ``save_every`` (or ``force``).

        Returns whether a checkpoint was started. A step that is already saved is left as it
        is (False): nothing is ever overwritten. With ``async_save`` the arrays are copied to
        the host before this returns, so the next (donating) train step may run at once.

        Raises:
          NonFiniteStateError: a floating leaf holds a NaN or an infinity; nothing is written.
          CheckpointWriteError: this write, or the previous asynchronous one, failed.
        """
        step = int(jax.device_get(state.step))
        if not force and step % self.save_every:
            return False
        self.wait()
        if step in self._manager.all_steps():
            return False
        host = _host_leaves(state)
        bad = _first_nonfinite(host)
        if bad is not None:
            raise NonFiniteStateError(
                f"the state of step {step} holds NaN or infinite values (first in {bad}), so it "
                f"was not saved to {str(self.directory)!r}; the checkpoints there are kept.",
                step=step,
                leaf=bad,
            )
        record = None
        if self.config is not None:
            record = {"fingerprint": config_fingerprint(self.config), "config": self.config}
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            config=ocp.args.JsonSave(record),
            integrity=ocp.args.JsonSave(_integrity_record(step, host)),
        )
        del host
        try:
            started = bool(self._manager.save(step, args=args, force=True))
        except Exception as err:  # OSError, tensorstore's ValueError, ...
            _remove_temporary(self.directory, step)
            raise _write_error(self.directory, step, err) from err
        self._pending = step if started else None
        return started

    def restore(self, like: Any, *, step: int | None = None, mesh: Mesh | None = None) -> Any:
        """Restore the newest checkpoint (or ``step``) into the structure and shardings of
        ``like`` (a state, or its ``jax.eval_shape``); see :func:`restore`."""
        self.wait()
        return _restore(self._manager, self.directory, like, step, mesh, self.config)

    def wait(self) -> None:
        """Block until every asynchronous save is complete.

        Raises:
          CheckpointWriteError: an asynchronous save failed (its step is not kept).
        """
        step, self._pending = self._pending, None
        try:
            self._manager.wait_until_finished()
            self._manager.check_for_errors()
        except Exception as err:
            if step is not None:
                _remove_temporary(self.directory, step)
            raise _write_error(self.directory, step, err) from err

    def close(self) -> None:
        """Wait for the asynchronous saves and release Orbax's threads (raises like ``wait``)."""
        if self._closed:
            return
        self._closed = True
        try:
            self.wait()
        except BaseException:
            with contextlib.suppress(Exception):
                self._manager.close()
            raise
        try:
            self._manager.close()
        except Exception as err:
            raise _write_error(self.directory, None, err) from err

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        # Already failing: a second error from closing must not hide the first.
        with contextlib.suppress(Exception):
            self.close()


def _restore(manager, directory, like, step, mesh, config) -> Any:
    steps = sorted(manager.all_steps())
    if not steps:
        raise CheckpointError(f"{str(directory)!r} holds no checkpoint to restore")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise CheckpointError(f"no checkpoint of step {step} in {str(directory)!r}; it has {steps}")
    _check_config(manager, directory, step, config)
    # Checkpoints from before the integrity item restore unchecked.
    checked = (directory / str(step) / "integrity").is_dir()
    items = {"state": ocp.args.StandardRestore(_target(like, mesh))}
    if checked:
        items["integrity"] = ocp.args.JsonRestore()
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as err:  # orbax raises many kinds on damaged files
        reason = _unreadable(err)
        if "like" not in reason:
            reason += ", or `like` does not match the saved state"
        raise _corrupt(directory, step, steps, reason) from err
    if checked:
        record = restored.integrity
        if not isinstance(record, dict) or record.get("format") != _INTEGRITY_FORMAT:
            raise _corrupt(directory, step, steps, "its integrity item is not a jaxdiff record")
        reason = _verify(restored.state, record)
        if reason is not None:
            raise _corrupt(directory, step, steps, reason)
    return restored.state


def _open_reader(workdir: str | os.PathLike) -> tuple[pathlib.Path, ocp.CheckpointManager | None]:
    directory = checkpoint_dir(workdir)
    if not directory.is_dir():
        return directory, None
    _quiet_orbax()
    return directory, _reader(directory)


def all_steps(workdir: str | os.PathLike) -> list[int]:
    """Steps of the complete checkpoints in ``workdir``, oldest first (empty when none)."""
    _, reader = _open_reader(workdir)
    if reader is None:
        return []
    try:
        return sorted(reader.all_steps())
    finally:
        reader.close()


def latest_step(workdir: str | os.PathLike) -> int | None:
    """The newest complete checkpoint's step in ``workdir``, or None when there is none."""
    steps = all_steps(workdir)
    return steps[-1] if steps else None


def restore(
    workdir: str | os.PathLike,
    like: Any,
    *,
    step: int | None = None,
    mesh: Mesh | None = None,
    config: Mapping | Any | None = None,
) -> Any:
    """Read a checkpoint of ``workdir`` (the newest, or ``step``), verifying its checksums.

    Args:
      workdir: the run's workdir.
      like: a state with the wanted structure, dtypes and shardings, e.g. a fresh
        :func:`jaxdiff.train.create_train_state` or its ``jax.eval_shape``; its arrays may
        have been donated.
      step: which checkpoint; default the newest.
      mesh: place every array replicated over this mesh instead of ``like``'s shardings.
      config: when given, the checkpoint's configuration must equal it; otherwise a
        :class:`CheckpointError` names the keys that differ.

    Returns:
      the restored state (the structure of ``like``).

    Raises:
      CorruptCheckpointError: the checkpoint cannot be read, or an array differs from the
        checksum written with it (``remaining`` lists the other steps).
      CheckpointError: no checkpoint (of ``step``); another configuration.
    """
    directory, reader = _open_reader(workdir)
    if reader is None:
        raise CheckpointError(f"{str(directory)!r} holds no checkpoint to restore")
    try:
        return _restore(
            reader, directory, like, step, mesh, None if config is None else _canonical(config)
        )
    finally:
        reader.close()


def save(
    workdir: str | os.PathLike,
    state: Any,
    *,
    config: Mapping | Any | None = None,
    keep: int | None = None,
) -> bool:
    """Save ``state`` at its step now and wait until it is on disk (see :class:`Checkpoints`).

    By default nothing else in the workdir is deleted; ``keep=K`` then keeps the newest K.
    """
    with Checkpoints(workdir, config=config, keep=keep, async_save=False) as manager:
        return manager.save(state, force=True)
