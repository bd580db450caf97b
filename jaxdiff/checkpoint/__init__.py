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
import hashlib
import json
import os
import pathlib
import shutil
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from jaxdiff.checkpoint.errors import (
    CheckpointError,
    CheckpointWriteError,
    CorruptCheckpointError,
    NonFiniteStateError,
    WorkdirLockedError,
    _write_error,
)
from jaxdiff.checkpoint.integrity import (
    _INTEGRITY_FORMAT,
    _first_nonfinite,
    _host_leaves,
    _integrity_record,
    _verify,
)
from jaxdiff.checkpoint.lock import LOCK_FILE, WorkdirLock
from jaxdiff.checkpoint.quiet import _quiet_orbax

__all__ = [
    "LOCK_FILE",
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
    "set_aside",
]

_SUBDIR = "checkpoints"


def checkpoint_dir(workdir: str | os.PathLike) -> pathlib.Path:
    """Where a workdir keeps its checkpoints: ``<workdir>/checkpoints``."""
    return pathlib.Path(workdir).absolute() / _SUBDIR


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
    # Orbax reports the first failed write while its other writers may still be adding files
    # to the directory (an rmtree then finds it not empty, or it comes back): retry a while.
    for _ in range(50):
        left = list(directory.glob(f"{step}.orbax-checkpoint-tmp*"))
        if not left:
            return
        for path in left:
            shutil.rmtree(path, ignore_errors=True)
        time.sleep(0.05)


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


SET_ASIDE = "checkpoints-set-aside"


def set_aside(workdir: str | os.PathLike, *, after: int) -> list[pathlib.Path]:
    """Move every checkpoint newer than step ``after`` out of the way, into
    ``<workdir>/checkpoints-set-aside/<step>`` (nothing is deleted), so that a run resumes from
    step ``after`` (0: from the start). For a corrupt newest checkpoint, or to go back to an
    earlier step. ``after`` must be 0 or a complete step. Process 0 moves; every process
    returns the new paths once the move is done."""
    steps = all_steps(workdir)
    if after != 0 and after not in steps:
        raise CheckpointError(
            f"no complete checkpoint of step {after} in {str(checkpoint_dir(workdir))!r}; it has "
            f"{steps} (0 starts from scratch)"
        )
    directory = checkpoint_dir(workdir)
    target = pathlib.Path(workdir).absolute() / SET_ASIDE
    moves = [
        (p, target / p.name)
        for p in sorted(directory.iterdir() if directory.is_dir() else [])
        if p.name.split(".")[0].isdigit() and int(p.name.split(".")[0]) > after
    ]
    if jax.process_index() == 0:
        for src, dst in moves:
            n = 1
            while dst.exists():  # set aside before: keep both
                dst, n = target / f"{src.name}.{n}", n + 1
            try:
                target.mkdir(exist_ok=True)
                src.rename(dst)
            except OSError as err:
                raise _write_error(target, None, err, what=f"set step {src.name} aside") from err
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("jaxdiff-set-aside")
    return [dst for _, dst in moves]


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
