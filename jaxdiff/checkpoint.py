"""Checkpoints of the training state: the only code that reads or writes it (Orbax).

A workdir keeps its checkpoints in ``<workdir>/checkpoints/<step>/``, each with two items:
``state`` (the :class:`jaxdiff.train.TrainState` pytree) and ``config`` (the run's configuration
and its SHA-256 fingerprint). Orbax writes every step into a temporary directory and renames it
when complete, so a crash never leaves a half-written step that looks finished.

Guarantees:

* nothing is ever overwritten: a step that exists is not saved again, and a workdir whose
  checkpoints were written with another configuration refuses both saving and restoring with a
  ValueError naming the keys that differ;
* only Orbax's keep-the-newest-K policy deletes checkpoints, and only after a newer one is
  complete; an error never deletes anything;
* a checkpoint that cannot be read raises a ValueError naming its path and what to do;
* restoring places every array on the sharding of ``like`` (or replicated over ``mesh``),
  whatever the number of devices that wrote it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "Checkpoints",
    "checkpoint_dir",
    "config_diff",
    "config_fingerprint",
    "latest_step",
    "restore",
    "save",
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


# --------------------------------------------------------------------------------------------
# Orbax plumbing
# --------------------------------------------------------------------------------------------


def _manager(directory: pathlib.Path, **options) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(**options),
        item_names=("state", "config"),
    )


def _read_only(directory: pathlib.Path) -> ocp.CheckpointManager:
    return _manager(directory, read_only=True, create=False, save_interval_steps=0)


def _corrupt(directory: pathlib.Path, step: int, steps: list[int], err: Exception) -> ValueError:
    others = [s for s in steps if s != step]
    fallback = (
        f"move that directory out of {str(directory)!r} to fall back to step {max(others)}, "
        f"or restore one of the steps {others} with step="
        if others
        else "move that directory away and start the run again"
    )
    return ValueError(
        f"checkpoint {str(directory / str(step))!r} cannot be read ({type(err).__name__}: "
        f"{err}). It is incomplete or corrupt, or `like` does not match the saved state; "
        f"{fallback}. Nothing was deleted."
    )


def _saved_config(manager: ocp.CheckpointManager, directory: pathlib.Path, step: int) -> Any:
    try:
        record = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        record = record.config
    except Exception as err:  # orbax raises many kinds on damaged files
        raise _corrupt(directory, step, list(manager.all_steps()), err) from err
    if record is not None and not (isinstance(record, dict) and "config" in record):
        raise _corrupt(
            directory,
            step,
            list(manager.all_steps()),
            ValueError(f"its config item is not a jaxdiff record: {record!r}"),
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
        raise ValueError(
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


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


class Checkpoints:
    """Save a run's state every ``save_every`` steps into a workdir, keeping the newest ``keep``.

    Opening checks the workdir: if its newest checkpoint was written with a configuration
    other than ``config``, a ValueError names the differing keys and nothing is written
    (checkpoints saved with ``config=None``, and opening with ``config=None``, skip the check).
    Pass the configuration that defines the run (model, diffusion, data, optimiser), not what
    may change on resumption (total steps, logging).

    Use as a context manager (or call :meth:`close`), so that asynchronous writes finish::

        with Checkpoints(workdir, config=cfg, save_every=1000, keep=3) as ckpt:
            if ckpt.latest_step() is not None:
                state = ckpt.restore(like=state)
            for batch in ...:
                state, metrics = train_step(state, batch)
                ckpt.save(state)
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
        if self.directory.exists():
            reader = _read_only(self.directory)
            steps = list(reader.all_steps())
            if steps:
                _check_config(reader, self.directory, max(steps), self.config)
            reader.close()
        self._manager = _manager(
            self.directory,
            max_to_keep=keep,
            save_interval_steps=1,
            enable_async_checkpointing=async_save,
        )

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
        """
        step = int(jax.device_get(state.step))
        if not force and step % self.save_every:
            return False
        if step in self._manager.all_steps():
            return False
        record = None
        if self.config is not None:
            record = {"fingerprint": config_fingerprint(self.config), "config": self.config}
        return bool(
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(record)
                ),
                force=True,
            )
        )

    def restore(self, like: Any, *, step: int | None = None, mesh: Mesh | None = None) -> Any:
        """Restore the newest checkpoint (or ``step``) into the structure and shardings of
        ``like`` (a state, or its ``jax.eval_shape``); see :func:`restore`."""
        self.wait()
        return _restore(self._manager, self.directory, like, step, mesh, self.config)

    def wait(self) -> None:
        """Block until every asynchronous save is complete."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _restore(manager, directory, like, step, mesh, config) -> Any:
    steps = sorted(manager.all_steps())
    if not steps:
        raise ValueError(f"{str(directory)!r} holds no checkpoint to restore")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ValueError(f"no checkpoint of step {step} in {str(directory)!r}; it has {steps}")
    _check_config(manager, directory, step, config)
    target = _target(like, mesh)
    try:
        restored = manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        )
    except Exception as err:  # orbax raises many kinds on damaged files
        raise _corrupt(directory, step, steps, err) from err
    return restored.state


def latest_step(workdir: str | os.PathLike) -> int | None:
    """The newest complete checkpoint's step in ``workdir``, or None when there is none."""
    directory = checkpoint_dir(workdir)
    if not directory.exists():
        return None
    reader = _read_only(directory)
    try:
        return reader.latest_step()
    finally:
        reader.close()


def restore(
    workdir: str | os.PathLike,
    like: Any,
    *,
    step: int | None = None,
    mesh: Mesh | None = None,
    config: Mapping | Any | None = None,
) -> Any:
    """Read a checkpoint of ``workdir`` (the newest, or ``step``).

    Args:
      workdir: the run's workdir.
      like: a state with the wanted structure, dtypes and shardings, e.g. a fresh
        :func:`jaxdiff.train.create_train_state` or its ``jax.eval_shape``; its arrays may
        have been donated.
      step: which checkpoint; default the newest.
      mesh: place every array replicated over this mesh instead of ``like``'s shardings.
      config: when given, the checkpoint's configuration must equal it; otherwise a ValueError
        names the keys that differ.

    Returns:
      the restored state (the structure of ``like``).
    """
    directory = checkpoint_dir(workdir)
    if not directory.exists():
        raise ValueError(f"{str(directory)!r} holds no checkpoint to restore")
    reader = _read_only(directory)
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
