"""A training run end to end: ``train_and_evaluate(config, workdir)``, and the work of the
``jaxdiff sample`` and ``jaxdiff bpd`` commands.

This is the impure shell around the library (Flax examples' ``train.py``): it reads data, writes
checkpoints (through :mod:`jaxdiff.checkpoint`), ``metrics.jsonl``, sample grids and a loss
curve into a workdir, and prints progress. Everything it computes comes from the library:
:mod:`jaxdiff.train` for the step, :mod:`jaxdiff.samplers` for sampling,
:mod:`jaxdiff.likelihood` for bits/dim. A workdir holds::

    config.json           the run's configuration (the CLI reads it back)
    checkpoints/<step>/   Orbax checkpoints (the newest ``keep``)
    metrics.jsonl         one JSON line per logged step (means over the steps since the last)
    tensorboard/          the same numbers as TensorBoard scalars (with --tensorboard)
    samples/step_<n>.png  sample grids of the EMA model; samples/latest.png
    loss.png              the loss curve
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pathlib
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxdiff import checkpoint, data, evaluation, features, objectives, progress, runlog, train
from jaxdiff import workdir as wd
from jaxdiff.config import (
    PRESETS,
    Config,
    DataConfig,
    DiffusionConfig,
    ModelConfig,
    RunConfig,
    load_config,
    validate,
)
from jaxdiff.evaluation import evaluate_bpd, sample_images

__all__ = [
    "Config",
    "Diverged",
    "Interrupted",
    "DataConfig",
    "DiffusionConfig",
    "ModelConfig",
    "PRESETS",
    "RunConfig",
    "evaluate_bpd",
    "load_config",
    "sample_images",
    "train_and_evaluate",
]


class _TrainingEval:
    """Sample quality every ``run.eval_every`` steps: ``run.eval_num`` DDIM samples of the EMA
    weights from the same noise each time, scored with the digits metric (digits) or FID (with
    Inception weights), against the training data's statistics (cached in ``<workdir>/eval``)."""

    def __init__(self, config: Config, model, workdir: pathlib.Path, main: bool, log):
        run = config.run
        self.every, self.num, self.seed = run.eval_every, run.eval_num, run.seed + 2
        self.extractors, self.refs = [], None
        if not self.every:
            return
        weights = run.inception_weights or os.environ.get(features.INCEPTION_ENV)
        if config.data.dataset == "digits":
            metric = "digits"
        elif weights:
            metric = "fid"
        else:
            log(
                "no evaluation during training: FID needs the Inception weights "
                f"(--inception-weights FILE or ${features.INCEPTION_ENV})"
            )
            self.every = 0
            return
        self.extractors = evaluation.extractors_for(config, metric, weights)
        for e in self.extractors:
            if self.num <= e.dim:
                raise ValueError(
                    f"eval_num = {self.num} is too few for the {e.name} metric's {e.dim}-d "
                    f"features: pass --eval-num {e.dim + 1} or more, or --eval-every 0"
                )
        self.config, self.log = config, log
        self.cache = workdir / "eval" if main else None
        self.sample = wd.sample_fn(config, model, min(250, self.num), run.sample_steps, 0.0, "ddim")

    def due(self, step: int, last: bool) -> bool:
        """At every multiple of ``every``, and at the run's last step when it is past one."""
        return bool(self.every) and (step % self.every == 0 or (last and step > self.every))

    def __call__(self, step: int, params) -> dict:
        start = time.perf_counter()
        if self.refs is None:
            if self.cache is not None:
                self.cache.mkdir(exist_ok=True)
            self.refs = [
                evaluation.reference_statistics(self.config, e, self.cache) for e in self.extractors
            ]
        stats, _, mean_pixel = evaluation.sample_statistics(
            self.sample, params, self.extractors, num=self.num, seed=self.seed, source="samples"
        )
        values = {}
        for e, s, ref in zip(self.extractors, stats, self.refs, strict=True):
            q = features.quality(s, ref)
            prefix = "digits_" if e.name == "digits" else "fid_"
            values["digits_fd" if e.name == "digits" else "fid"] = q["fd"]
            for k in ("is", "precision", "recall"):
                if k in q:
                    values[prefix + k] = q[k]
        values["eval_mean_pixel"] = mean_pixel
        head = ", ".join(f"{k} {v:.4g}" for k, v in values.items())
        self.log(
            f"eval at step {step} ({self.num} samples, {time.perf_counter() - start:.0f} s): {head}"
        )
        return values


class Diverged(ValueError):
    """The loss or a gradient was non-finite for ``max_nonfinite_steps`` consecutive steps."""

    def __init__(self, message: str, *, step: int, latest_checkpoint: int | None):
        super().__init__(message)
        self.step = step
        self.latest_checkpoint = latest_checkpoint


class Interrupted(Exception):  # noqa: N818 (a stop request, not an error)
    """SIGINT or SIGTERM stopped training; ``saved`` is the checkpoint step written on the way
    out (None when the state could not be saved, e.g. inside a run of non-finite steps)."""

    def __init__(self, signum: int, step: int, saved: int | None, latest: int | None):
        name = signal.Signals(signum).name
        what = (
            f"saved the checkpoint of step {saved}"
            if saved is not None
            else f"nothing saved (the newest checkpoint is step {latest})"
        )
        super().__init__(f"stopped by {name} at step {step}; {what}")
        self.signum, self.step, self.saved, self.latest = signum, step, saved, latest


class _StopSignals:
    """SIGINT and SIGTERM set a flag that the training loop checks after each step; a second
    signal raises KeyboardInterrupt at once. Installed only in the main thread."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def requested(self) -> int | None:
        """The signal that asked to stop, agreed by every process (any process's request
        stops all of them at the same step)."""
        if jax.process_count() == 1:
            return self.signum
        from jax.experimental import multihost_utils

        asked = multihost_utils.process_allgather(np.int32(self.signum or 0))
        return int(np.max(asked)) or None


def train_and_evaluate(
    config: Config,
    workdir: str | os.PathLike,
    *,
    log: Callable[[str], None] | None = None,
    restore_step: int | None = None,
    bar: bool | None = None,
) -> train.TrainState:
    """Train (or resume) the run of ``config`` in ``workdir`` to ``config.run.steps`` steps.

    ``restore_step=N`` resumes from checkpoint N instead of the newest: the newer ones are moved
    to ``<workdir>/checkpoints-set-aside/`` (:func:`jaxdiff.checkpoint.set_aside`; nothing is
    deleted), e.g. past a corrupt newest checkpoint; 0 starts again from scratch.

    Resuming restores the newest checkpoint; the result equals that of an uninterrupted run with
    the same configuration (the batches are a function of the step and the seed, the step's
    randomness of the step and the key). A workdir trained with another configuration is
    refused with a ValueError naming the differences, and nothing in it is changed.

    Faults lose no work:

    * one process writes a workdir: a second run on it is refused at once
      (:class:`jaxdiff.checkpoint.WorkdirLockedError`, naming the holder);
    * a step whose loss or gradient is NaN or infinite is skipped (its update is not applied;
      ``skipped_steps`` in ``metrics.jsonl``); after ``run.max_nonfinite_steps`` consecutive
      skips the run stops with :class:`Diverged`, and no checkpoint is written inside such a
      run of skips, so the newest finite checkpoint is never rotated out;
    * SIGINT or SIGTERM saves a checkpoint at the current step and raises :class:`Interrupted`;
    * ``metrics.jsonl`` is strict JSON (a non-finite value is null), and every other file is
      replaced atomically.
    """
    # a progress bar on a terminal (when nobody else takes the lines), else a line per window
    bar = (log is None and progress.interactive()) if bar is None else bar
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    workdir = pathlib.Path(workdir)
    run = config.run
    if run.steps < 0 or run.batch_size < 1:
        raise ValueError(f"need steps >= 0 and batch_size >= 1, got {run.steps}, {run.batch_size}")
    if run.max_nonfinite_steps < 1:
        raise ValueError(f"max_nonfinite_steps must be >= 1, got {run.max_nonfinite_steps}")
    config = wd.resolve_schedule(validate(config))
    config, note = wd.resolve_channels(config)  # config.json records the count
    if note and jax.process_index() == 0:
        log(note)
    # Every process computes; only the first writes files (Orbax coordinates the checkpoints)
    # and holds the workdir's lock.
    main = jax.process_index() == 0
    with _workdir_lock(workdir, main), _StopSignals() as stop:
        if restore_step is not None:
            moved = checkpoint.set_aside(workdir, after=restore_step)
            if moved:
                log(f"set aside {[p.name for p in moved]} in {moved[0].parent}")
        d = config.data
        log(
            f"training {workdir}: {run.steps} steps of {run.batch_size} images "
            f"({d.dataset} {d.image_size}x{d.image_size}) on {jax.device_count()} "
            f"{jax.devices()[0].platform} device(s)"
        )
        return _train_locked(config, workdir, log, main, stop, bar and main)


@contextlib.contextmanager
def _workdir_lock(workdir: pathlib.Path, main: bool):
    """Process 0 holds the workdir's lock for the run; when it is refused, every process
    raises together (the others would otherwise wait for process 0 at Orbax's barrier)."""
    lock = checkpoint.WorkdirLock(workdir)
    error = None
    if main:
        try:
            lock.acquire()
        except checkpoint.CheckpointError as err:
            error = err
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        refused = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
        if int(refused) and error is None:
            raise ValueError(f"process 0 could not lock the workdir {str(workdir)!r}; see its log")
    if error is not None:
        raise error
    try:
        yield
    finally:
        lock.release()


def _train_locked(
    config: Config, workdir: pathlib.Path, log, main: bool, stop, bar: bool
) -> train.TrainState:
    run = config.run
    if run.tensorboard and main:
        runlog.tensorboard_writer()  # a missing tensorboardX is named before anything runs
    dataset = wd.load_dataset(config.data, "train")
    if len(dataset) < run.batch_size:
        raise ValueError(
            f"the dataset has {len(dataset)} images, fewer than batch_size={run.batch_size}"
        )
    mesh = train.make_mesh()
    if run.batch_size % mesh.size:
        raise ValueError(
            f"batch_size {run.batch_size} is not divisible by the device count {mesh.size}; "
            f"use a multiple of {mesh.size}"
        )
    model = wd.build_model(config)
    optimizer = wd.build_optimizer(config)
    loss_fn = objectives.loss_fn_from_config(model.apply, config)
    train_step = train.make_train_step(
        loss_fn,
        optimizer,
        ema=wd.build_ema(config),
        grad_accum_steps=config.optim.grad_accum_steps,
        mesh=mesh,
    )
    log("initialising the network (compiled once; a later run loads it from the cache)")
    state = wd.initial_state(config, model, optimizer, mesh)
    conditional = config.model.num_classes is not None
    if conditional:
        labels = data.dataset_labels(dataset)
        if labels.max() >= config.model.num_classes:
            raise ValueError(
                f"the dataset has labels up to {labels.max()}, more than num_classes = "
                f"{config.model.num_classes} allows: pass --num-classes {labels.max() + 1}"
            )

    with checkpoint.Checkpoints(
        workdir, config=config.identity(), save_every=run.save_every, keep=run.keep
    ) as ckpt:
        start = ckpt.latest_step()
        if start is not None:
            state = ckpt.restore(state, mesh=mesh)
            log(f"resumed from the checkpoint of step {start} in {workdir}")
        if main:
            text = json.dumps(config.to_dict(), indent=2) + "\n"
            wd.write_atomic(workdir / "config.json", lambda tmp: tmp.write_text(text))
            (workdir / "samples").mkdir(exist_ok=True)
        sample = wd.sample_fn(config, model, run.num_samples, run.sample_steps, 0.0, "ddim")
        sample_key = jax.random.PRNGKey(run.seed + 1)

        cols = config.model.num_classes  # a conditional grid: one column per class

        def write_samples(step: int) -> None:
            images = wd.to_uint8(sample(state.ema_params, sample_key))
            if not main:
                return
            for name in (f"step_{step}.png", "latest.png"):
                path = workdir / "samples" / name
                wd.write_atomic(path, lambda tmp: wd.grid_png(images, tmp, cols))

        step = start_step = int(state.step)
        shown = None
        if bar:
            shown = progress.Progress(run.steps, desc="train", initial=start_step, bar=True)
        log = shown.write if shown else log  # lines above the bar
        quality = _TrainingEval(config, model, workdir, main, log)
        guard = _NonFiniteGuard(run.max_nonfinite_steps, ckpt, log)
        window_start, window_images = time.perf_counter(), 0
        run_start = window_start
        window = None
        batch_of = functools.partial(
            data.batch_at,
            dataset,
            batch_size=run.batch_size,
            seed=run.seed,
            flip=config.data.flip,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            labels=conditional,
        )
        with (
            runlog.MetricsLog(
                workdir, write=main, tensorboard=run.tensorboard, start_step=start
            ) as metrics_log,
            contextlib.closing(data.prefetch(batch_of, start_step, run.steps)) as batches,
            shown or contextlib.nullcontext(),
        ):
            for _, batch in batches:
                first = window_images == 0 and step == start_step
                if first:
                    log(
                        "compiling the train step (the first call; a later run of the same "
                        "configuration loads it from the compilation cache)"
                    )
                    compile_start = time.perf_counter()
                state, metrics = train_step(state, train.shard_batch(batch, mesh))
                if window is None:
                    window = runlog.window_init(metrics)
                window = runlog.window_add(window, metrics)
                if first:  # the one host sync outside logging: keeps compilation out of img/s
                    jax.block_until_ready(metrics["loss"])
                    log(f"first step done in {time.perf_counter() - compile_start:.1f} s")
                    window_start, window_images = time.perf_counter(), -run.batch_size
                step += 1
                window_images += run.batch_size
                if shown is not None:
                    shown.update(1)
                # reads the previous step's flag, which is ready by now: no stall per step
                guard.record(step, metrics["skipped"])
                if step % run.save_every == 0 or guard.save_pending:
                    guard.flush()
                    guard.save(state)
                if step % run.log_every == 0 or step == run.steps:
                    guard.flush()
                    values = runlog.window_values(window)  # the means over the window's steps
                    window = runlog.window_init(metrics, window)
                    elapsed = time.perf_counter() - window_start
                    values["images_per_s"] = window_images / max(elapsed, 1e-9)
                    values.pop("skipped")  # the window's count instead of the last flag
                    values["skipped_steps"] = guard.take_window()
                    metrics_log.write(step, values)
                    if shown is not None:
                        shown.update(0, loss=values["loss"], img_s=round(values["images_per_s"]))
                    else:
                        _progress_line(log, step, run, values, time.perf_counter() - run_start)
                    window_start, window_images = time.perf_counter(), 0
                paused = time.perf_counter()
                if run.sample_every and step % run.sample_every == 0:
                    write_samples(step)
                if quality.due(step, last=step == run.steps):
                    values = quality(step, state.ema_params)
                    metrics_log.write(step, values)
                window_start += time.perf_counter() - paused  # throughput counts training only
                # across processes agreeing on a stop is a collective: only at logged steps
                agree = jax.process_count() == 1 or step % run.log_every == 0
                signum = stop.requested() if agree else None
                if signum is not None:
                    guard.flush()
                    guard.save(state, force=True)
                    ckpt.wait()
                    latest = ckpt.latest_step()
                    raise Interrupted(signum, step, step if latest == step else None, latest)
            guard.flush()
            guard.save(state, force=True)
        write_samples(step)
        if main:
            wd.write_atomic(
                workdir / "loss.png", lambda tmp: runlog.loss_png(metrics_log.path, tmp)
            )
    log(f"done: {workdir} (samples/latest.png, loss.png, metrics.jsonl, checkpoints/)")
    return state


def _progress_line(log, step: int, run, values: dict, elapsed: float) -> None:
    """The plain progress line of a logging window (when stderr is not a terminal)."""
    done = int(30 * step / max(run.steps, 1))
    left = (run.steps - step) * run.batch_size / max(values["images_per_s"], 1e-9)
    log(
        f"[{'#' * done}{'.' * (30 - done)}] step {step}/{run.steps} "
        f"loss {values['loss']:.4f} {values['images_per_s']:.0f} img/s, "
        f"{runlog.duration(elapsed)} elapsed, {runlog.duration(left)} left"
    )


class _NonFiniteGuard:
    """Counts the train step's ``skipped`` flags on the host, one step late (the flag of step
    n is read after step n + 1 is dispatched, so the device never waits for the host), stops
    the run after ``limit`` consecutive skips, and holds back checkpoints inside a run of
    skips."""

    def __init__(self, limit: int, ckpt: checkpoint.Checkpoints, log):
        self.limit, self.ckpt, self.log = limit, ckpt, log
        self.streak = 0
        self.window = 0
        self.save_pending = False
        self._pending: tuple[int, Any] | None = None

    def record(self, step: int, flag) -> None:
        previous, self._pending = self._pending, (step, flag)
        if previous is not None:
            self._count(*previous)

    def flush(self) -> None:
        if self._pending is not None:
            self._count(*self._pending)
            self._pending = None

    def _count(self, step: int, flag) -> None:
        if not float(flag):
            self.streak = 0
            return
        self.streak += 1
        self.window += 1
        if self.streak == 1:
            self.log(
                f"step {step}: the loss or a gradient is NaN or infinite; the update is skipped "
                f"(the run stops after {self.limit} in a row)"
            )
        if self.streak >= self.limit:
            latest = self.ckpt.latest_step()
            raise Diverged(
                f"training diverged: the loss or a gradient was NaN or infinite at each of the "
                f"{self.streak} steps {step - self.streak + 1}..{step} (updates skipped), so the "
                f"run stopped. The newest checkpoint, step {latest}, is finite and kept. Lower "
                "the learning rate (--lr), or raise --max-nonfinite-steps to wait longer.",
                step=step,
                latest_checkpoint=latest,
            )

    def take_window(self) -> int:
        count, self.window = self.window, 0
        return count

    def save(self, state, *, force: bool = False) -> bool:
        """Save unless the newest step was skipped (then retry after the next finite one)."""
        if self.streak:
            self.save_pending = True
            return False
        force, self.save_pending = force or self.save_pending, False
        return self.ckpt.save(state, force=force)
