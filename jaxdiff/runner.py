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
    samples/step_<n>.png  sample grids of the EMA model; samples/latest.png
    loss.png              the loss curve
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import checkpoint, data, evaluation, features, objectives, train
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


_EVAL_KEYS = (
    ("digits_fd", "digits Frechet distance of samples during training"),
    ("fid", "FID of samples during training"),
)


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


def _panel(draw, box, points, title: str, log_scale: bool) -> None:
    """A line plot of ``points`` (step, value) inside ``box`` = (left, top, right, bottom)."""
    left, top, right, bottom = box
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text((left, top - 20), title, fill="black")
    points = [(x, math.log10(max(y, 1e-12)) if log_scale else y) for x, y in points]
    if len(points) < 2:
        return
    xs, ys = zip(*points, strict=True)
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    y1 = y1 if y1 > y0 else y0 + 1

    def to_px(x, y):
        px = left + (x - x0) / max(x1 - x0, 1) * (right - left)
        return px, bottom - (y - y0) / (y1 - y0) * (bottom - top)

    draw.line([to_px(x, y) for x, y in points], fill=(31, 119, 180), width=2)
    for x, y in points if len(points) <= 20 else ():
        px, py = to_px(x, y)
        draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=(31, 119, 180))
    label = (lambda v: f"{10**v:.3g}") if log_scale else (lambda v: f"{v:.3g}")
    draw.text((left, bottom + 8), f"step {x0}", fill="black")
    draw.text((right - 70, bottom + 8), f"step {x1}", fill="black")
    draw.text((left - 46, top), label(y1), fill="black")
    draw.text((left - 46, bottom - 10), label(y0), fill="black")


def _loss_png(metrics_path: pathlib.Path, path: pathlib.Path) -> None:
    """Plot the training loss (log scale) against the step from metrics.jsonl and, beside it,
    the Fréchet distance of the evaluations during training (when there are any)."""
    from PIL import Image, ImageDraw

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    loss = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    quality = [(k, n) for k, n in _EVAL_KEYS if any(r.get(k) is not None for r in rows)]
    width, height = (1200 if quality else 640), 400
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    _panel(draw, (60, 30, 620, height - 40), loss, "training loss (log scale)", True)
    for key, name in quality[:1]:
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        _panel(draw, (680, 30, width - 20, height - 40), points, name, False)
    img.save(path, format="PNG")


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


def _truncate_metrics(path: pathlib.Path, keep_through: int | None) -> None:
    """Keep only the lines up to the restored step: the steps a killed run logged after its
    last checkpoint are run, and logged, again (and a line torn by the kill is dropped)."""
    lines = path.read_text().splitlines() if path.exists() and keep_through is not None else []
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= keep_through:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    wd.write_atomic(path, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept)))


_LAST = ("learning_rate", "skipped")  # logged as the window's last value


@jax.jit
def _window_add(window: dict, metrics: dict) -> dict:
    """Fold one step's metrics into the logging window, on the device (no host sync): sums of
    the finite values and their counts, the last learning rate, and the decay of the last EMA
    update (steps where the EMA is left alone have decay 1 and are not updates)."""
    out = dict(window)
    for name, value in metrics.items():
        value = value.astype(jnp.float32)
        if name in _LAST:
            out[name] = value
        elif name == "ema_decay":
            out[name] = jnp.where(value < 1, value, window[name])
        else:
            finite = jnp.isfinite(value)
            out[name] = window[name] + jnp.where(finite, value, 0.0)
            out[f"{name}/count"] = window[f"{name}/count"] + finite.astype(jnp.float32)
    return out


def _window_init(metrics_shape: dict, previous: dict | None = None) -> dict:
    window = {}
    for name in metrics_shape:
        if name in _LAST:
            window[name] = jnp.zeros((), jnp.float32)
        elif name == "ema_decay":  # carried over: an EMA may update less often than logging
            window[name] = jnp.ones((), jnp.float32) if previous is None else previous[name]
        else:
            window[name] = window[f"{name}/count"] = jnp.zeros((), jnp.float32)
    return window


def _window_values(window: dict) -> dict[str, float]:
    """The window's means (NaN when no step of it was finite), last and EMA values."""
    got = {k: float(v) for k, v in jax.device_get(window).items()}
    out = {}
    for name, value in got.items():
        if name.endswith("/count"):
            continue
        count = got.get(f"{name}/count")
        out[name] = value if count is None else (value / count if count else math.nan)
    return out


def _duration(seconds: float) -> str:
    """``42s``, ``3m05s`` or ``1h02m``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _json_line(values: dict) -> str:
    """One strict-JSON line: a NaN or infinite value is written as null."""
    clean = {
        k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in values.items()
    }
    return json.dumps(clean, allow_nan=False)


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
        return _train_locked(config, workdir, log, main, stop)


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


def _train_locked(config: Config, workdir: pathlib.Path, log, main: bool, stop) -> train.TrainState:
    run = config.run
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
        metrics_path = workdir / "metrics.jsonl"
        if main:
            text = json.dumps(config.to_dict(), indent=2) + "\n"
            wd.write_atomic(workdir / "config.json", lambda tmp: tmp.write_text(text))
            _truncate_metrics(metrics_path, start)
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
        quality = _TrainingEval(config, model, workdir, main, log)
        guard = _NonFiniteGuard(run.max_nonfinite_steps, ckpt, log)
        window_start, window_images = time.perf_counter(), 0
        run_start = window_start
        window = None
        with open(metrics_path if main else os.devnull, "a") as metrics_file:
            while step < run.steps:
                batch = data.batch_at(
                    dataset,
                    step,
                    run.batch_size,
                    seed=run.seed,
                    flip=config.data.flip,
                    process_index=jax.process_index(),
                    process_count=jax.process_count(),
                    labels=conditional,
                )
                first = window_images == 0 and step == start_step
                if first:
                    log(
                        "compiling the train step (the first call; a later run of the same "
                        "configuration loads it from the compilation cache)"
                    )
                    compile_start = time.perf_counter()
                state, metrics = train_step(state, train.shard_batch(batch, mesh))
                if window is None:
                    window = _window_init(metrics)
                window = _window_add(window, metrics)
                if first:  # the one host sync outside logging: keeps compilation out of img/s
                    jax.block_until_ready(metrics["loss"])
                    log(f"first step done in {time.perf_counter() - compile_start:.1f} s")
                    window_start, window_images = time.perf_counter(), -run.batch_size
                step += 1
                window_images += run.batch_size
                # reads the previous step's flag, which is ready by now: no stall per step
                guard.record(step, metrics["skipped"])
                if step % run.save_every == 0 or guard.save_pending:
                    guard.flush()
                    guard.save(state)
                if step % run.log_every == 0 or step == run.steps:
                    guard.flush()
                    values = _window_values(window)  # the means over the window's steps
                    window = _window_init(metrics, window)
                    elapsed = time.perf_counter() - window_start
                    values["images_per_s"] = window_images / max(elapsed, 1e-9)
                    values.pop("skipped")  # the window's count instead of the last flag
                    values["skipped_steps"] = guard.take_window()
                    metrics_file.write(_json_line({"step": step, **values}) + "\n")
                    metrics_file.flush()
                    done = int(30 * step / max(run.steps, 1))
                    left = (run.steps - step) * run.batch_size / max(values["images_per_s"], 1e-9)
                    log(
                        f"[{'#' * done}{'.' * (30 - done)}] step {step}/{run.steps} "
                        f"loss {values['loss']:.4f} {values['images_per_s']:.0f} img/s, "
                        f"{_duration(time.perf_counter() - run_start)} elapsed, "
                        f"{_duration(left)} left"
                    )
                    window_start, window_images = time.perf_counter(), 0
                paused = time.perf_counter()
                if step % run.sample_every == 0:
                    write_samples(step)
                if quality.due(step, last=step == run.steps):
                    values = quality(step, state.ema_params)
                    metrics_file.write(_json_line({"step": step, **values}) + "\n")
                    metrics_file.flush()
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
            wd.write_atomic(workdir / "loss.png", lambda tmp: _loss_png(metrics_path, tmp))
    log(f"done: {workdir} (samples/latest.png, loss.png, metrics.jsonl, checkpoints/)")
    return state


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
