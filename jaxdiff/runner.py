"""A training run end to end: ``train_and_evaluate(config, workdir)``, and the work of the
``jaxdiff sample`` and ``jaxdiff bpd`` commands.

This is the impure shell around the library (Flax examples' ``train.py``): it reads data, writes
checkpoints (through :mod:`jaxdiff.checkpoint`), ``metrics.jsonl``, sample grids and a loss
curve into a workdir, and prints progress. Everything it computes comes from the library:
:mod:`jaxdiff.train` for the step, :mod:`jaxdiff.samplers` for sampling,
:mod:`jaxdiff.likelihood` for bits/dim. A workdir holds::

    config.json           the run's configuration (the CLI reads it back)
    checkpoints/<step>/   Orbax checkpoints (the newest ``keep``)
    metrics.jsonl         one JSON line per logged step
    samples/step_<n>.png  sample grids of the EMA model; samples/latest.png
    loss.png              the loss curve
"""

from __future__ import annotations

import contextlib
import functools
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

from jaxdiff import checkpoint, data, gaussian, likelihood, samplers, schedules, train
from jaxdiff.compilation import compiler_options
from jaxdiff.config import (
    PRESETS,
    Config,
    DataConfig,
    DiffusionConfig,
    ModelConfig,
    RunConfig,
    load_config,
)
from jaxdiff.models import Unet

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


def _dataset(cfg: DataConfig, split: str):
    if cfg.dataset == "digits":
        return data.load_digits(cfg.image_size, split=split)
    if cfg.dataset == "folder":
        if not cfg.folder:
            raise ValueError("dataset 'folder' needs a folder (--data-dir)")
        return data.ImageFolder(cfg.folder, cfg.image_size, channels=cfg.channels).load()
    raise ValueError(f"unknown dataset {cfg.dataset!r}; choose 'digits' or 'folder'")


def _channels(cfg: DataConfig) -> int:
    return 1 if cfg.dataset == "digits" else cfg.channels


def _model(config: Config) -> Unet:
    m = config.model
    return Unet(
        dim=m.dim,
        dim_mults=tuple(m.dim_mults),
        channels=_channels(config.data),
        dropout=m.dropout,
        attn_heads=m.attn_heads,
        attn_dim_head=m.attn_dim_head,
        dtype=None if m.dtype == "float32" else m.dtype,
        remat=m.remat,
    )


def _coeffs(cfg: DiffusionConfig, convention: str = "lucidrains") -> gaussian.DiffusionCoeffs:
    betas = schedules.get_named_beta_schedule(cfg.schedule, cfg.timesteps)
    return gaussian.make_coeffs(betas, convention=convention)


def _initial_state(config: Config, model: Unet, optimizer, mesh):
    key = jax.random.PRNGKey(config.run.seed)
    size = config.data.image_size
    x = jnp.zeros((1, size, size, _channels(config.data)))
    params = model.init(jax.random.fold_in(key, 1), x, jnp.zeros((1,)))
    return train.create_train_state(params, optimizer, jax.random.fold_in(key, 2), mesh=mesh)


def _grid_png(images: np.ndarray, path: pathlib.Path) -> None:
    """Save uint8 [N, H, W, C] as one square-ish grid PNG with 2-pixel gaps."""
    from PIL import Image

    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + 2) + 2, cols * (w + 2) + 2, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        grid[2 + r * (h + 2) : 2 + r * (h + 2) + h, 2 + q * (w + 2) : 2 + q * (w + 2) + w] = img
    scale = max(1, 512 // grid.shape[0])
    pil = Image.fromarray(grid[..., 0] if c == 1 else grid)
    big = pil.resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    big.save(path, format="PNG")


def _loss_png(metrics_path: pathlib.Path, path: pathlib.Path) -> None:
    """Plot log10(loss) against the step from metrics.jsonl, with Pillow."""
    from PIL import Image, ImageDraw

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    points = [
        (r["step"], math.log10(max(r["loss"], 1e-12))) for r in rows if r.get("loss") is not None
    ]
    width, height, pad = 640, 400, 50
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle([pad, pad // 2, width - pad // 2, height - pad], outline="black")
    if len(points) >= 2:
        xs, ys = zip(*points, strict=True)
        x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
        y1 = y1 if y1 > y0 else y0 + 1

        def to_px(x, y):
            px = pad + (x - x0) / max(x1 - x0, 1) * (width - 1.5 * pad)
            py = height - pad - (y - y0) / (y1 - y0) * (height - 1.5 * pad)
            return px, py

        draw.line([to_px(x, y) for x, y in points], fill=(31, 119, 180), width=2)
        draw.text((pad, height - pad + 8), f"step {x0}", fill="black")
        draw.text((width - pad * 2, height - pad + 8), f"step {x1}", fill="black")
        draw.text((4, pad // 2), f"{10**y1:.3g}", fill="black")
        draw.text((4, height - pad - 10), f"{10**y0:.3g}", fill="black")
    draw.text((pad, 4), "training loss (log scale)", fill="black")
    img.save(path, format="PNG")


def _sample_fn(config: Config, model: Unet, num: int, steps: int, eta: float, sampler: str):
    c = _coeffs(config.diffusion)
    size, channels = config.data.image_size, _channels(config.data)
    objective = config.diffusion.objective

    @functools.partial(jax.jit, compiler_options=compiler_options())
    def run(params, key):
        x_T = jax.random.normal(jax.random.fold_in(key, 0), (num, size, size, channels))

        def model_fn(x, t):
            return model.apply(params, x, t)

        noise_key = jax.random.fold_in(key, 1)
        if sampler == "ddpm":
            out = samplers.ddpm_sample(model_fn, c, x_T, key=noise_key, mean_type=objective)
        else:
            grid = samplers.ddim_grid(c.num_timesteps, steps)
            out = samplers.ddim_sample(
                model_fn, c, x_T, grid=grid, eta=eta, key=noise_key, mean_type=objective
            )
        return out.sample

    return run


def _to_uint8(x) -> np.ndarray:
    return data.to_uint8(np.asarray(x))


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


def _write_atomic(path: pathlib.Path, write: Callable[[pathlib.Path], None]) -> None:
    """``write(tmp)`` then rename over ``path``: a full disk or a kill never leaves a truncated
    file where a good one was."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
    _write_atomic(path, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept)))


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
    # Every process computes; only the first writes files (Orbax coordinates the checkpoints)
    # and holds the workdir's lock.
    main = jax.process_index() == 0
    with _workdir_lock(workdir, main), _StopSignals() as stop:
        if restore_step is not None:
            moved = checkpoint.set_aside(workdir, after=restore_step)
            if moved:
                log(f"set aside {[p.name for p in moved]} in {moved[0].parent}")
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
    dataset = _dataset(config.data, "train" if config.data.dataset == "digits" else "all")
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
    model = _model(config)
    optimizer = train.default_optimizer(run.lr)
    loss_fn = train.diffusion_loss_fn(
        model.apply,
        _coeffs(config.diffusion),
        loss="simple",
        objective=config.diffusion.objective,
        min_snr_gamma=config.diffusion.min_snr_gamma,
    )
    train_step = train.make_train_step(loss_fn, optimizer, mesh=mesh)
    state = _initial_state(config, model, optimizer, mesh)

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
            _write_atomic(workdir / "config.json", lambda tmp: tmp.write_text(text))
            _truncate_metrics(metrics_path, start)
            (workdir / "samples").mkdir(exist_ok=True)
        sample = _sample_fn(config, model, run.num_samples, run.sample_steps, 0.0, "ddim")
        sample_key = jax.random.PRNGKey(run.seed + 1)

        def write_samples(step: int) -> None:
            images = _to_uint8(sample(state.ema_params, sample_key))
            if not main:
                return
            for name in (f"step_{step}.png", "latest.png"):
                _write_atomic(workdir / "samples" / name, lambda tmp: _grid_png(images, tmp))

        step = int(state.step)
        guard = _NonFiniteGuard(run.max_nonfinite_steps, ckpt, log)
        window_start, window_images = time.perf_counter(), 0
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
                )
                state, metrics = train_step(state, train.shard_batch(batch, mesh))
                step += 1
                window_images += run.batch_size
                # reads the previous step's flag, which is ready by now: no stall per step
                guard.record(step, metrics["skipped"])
                if step % run.save_every == 0 or guard.save_pending:
                    guard.flush()
                    guard.save(state)
                if step % run.log_every == 0 or step == run.steps:
                    guard.flush()
                    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    elapsed = time.perf_counter() - window_start
                    values["images_per_s"] = window_images / max(elapsed, 1e-9)
                    values.pop("skipped")  # the window's count instead of the last flag
                    values["skipped_steps"] = guard.take_window()
                    metrics_file.write(_json_line({"step": step, **values}) + "\n")
                    metrics_file.flush()
                    done = int(30 * step / max(run.steps, 1))
                    log(
                        f"[{'#' * done}{'.' * (30 - done)}] step {step}/{run.steps} "
                        f"loss {values['loss']:.4f} {values['images_per_s']:.0f} img/s"
                    )
                    window_start, window_images = time.perf_counter(), 0
                if step % run.sample_every == 0:
                    write_samples(step)
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
            _write_atomic(workdir / "loss.png", lambda tmp: _loss_png(metrics_path, tmp))
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


def _restored(workdir: str | os.PathLike, step: int | None, *, finite: bool = True):
    config = load_config(workdir)
    model = _model(config)
    optimizer = train.default_optimizer(config.run.lr)
    like = jax.eval_shape(lambda: _initial_state(config, model, optimizer, None))
    state = checkpoint.restore(workdir, like, step=step, config=config.identity())
    bad = train.nonfinite_leaves(state.ema_params) if finite else []
    if bad:
        raise ValueError(
            f"the checkpoint of step {int(state.step)} in {str(workdir)!r} holds NaN or "
            f"infinite EMA parameters ({len(bad)} arrays, e.g. {bad[0]}): the run diverged "
            f"before it was saved. Use an earlier step (--step N){_other_steps(workdir, state)}."
        )
    return config, model, state


def _other_steps(workdir, state) -> str:
    others = [s for s in checkpoint.all_steps(workdir) if s != int(state.step)]
    return f"; the workdir has steps {others}" if others else ""


def _refuse_nonfinite(values, what: str, step: int) -> None:
    if not np.isfinite(np.asarray(values)).all():
        raise ValueError(
            f"{what} of the checkpoint of step {step} are NaN or infinite, so nothing was "
            "written; the model is broken at that step: try an earlier one (--step N)"
        )


def sample_images(
    workdir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    num: int = 64,
    sampler: str = "ddim",
    steps: int = 50,
    eta: float = 0.0,
    seed: int = 0,
    step: int | None = None,
    overwrite: bool = False,
) -> np.ndarray:
    """Sample ``num`` images from a workdir's EMA weights; write ``out`` (.png grid) and the
    uint8 array next to it (.npz). Returns the images."""
    if sampler not in ("ddim", "ddpm"):
        raise ValueError(f"unknown sampler {sampler!r}; choose 'ddim' or 'ddpm'")
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    out = pathlib.Path(out)
    targets = [out.with_suffix(".png"), out.with_suffix(".npz")]
    existing = [str(p) for p in targets if p.exists()]
    if existing and not overwrite:
        raise ValueError(f"{existing} exist; pass --force to replace them")
    config, model, state = _restored(workdir, step)
    if not 1 <= steps <= config.diffusion.timesteps:
        raise ValueError(f"steps must be in [1, {config.diffusion.timesteps}], got {steps}")
    run = _sample_fn(config, model, num, steps, eta, sampler)
    raw = np.asarray(run(state.ema_params, jax.random.PRNGKey(seed)))
    _refuse_nonfinite(raw, "the samples", int(state.step))
    images = _to_uint8(raw)
    out.parent.mkdir(parents=True, exist_ok=True)
    _grid_png(images, targets[0])
    np.savez_compressed(targets[1], images=images)
    return images


def evaluate_bpd(
    workdir: str | os.PathLike,
    *,
    split: str = "test",
    batch_size: int = 256,
    seed: int = 0,
    step: int | None = None,
    at_init: bool = False,
    tails: str = "exact",
) -> dict[str, Any]:
    """Bits/dim of the EMA model on a split of the run's data (the full bound, T network calls
    per batch, fixed-small variance). ``at_init`` evaluates the untrained network instead;
    ``tails="reference"`` computes the decoder term with the references' float32 arithmetic
    (:func:`jaxdiff.likelihood.discretized_gaussian_log_likelihood`)."""
    likelihood.check_tails(tails)
    config, model, state = _restored(workdir, step, finite=not at_init)
    if at_init:
        optimizer = train.default_optimizer(config.run.lr)
        state = _initial_state(config, model, optimizer, None)
    dataset = _dataset(config.data, split)
    images = data.to_unit_range(dataset.get(np.arange(len(dataset))))
    # The decoder term needs a finite variance at t = 0: improved-diffusion's beta-tilde_1, not
    # denoising-diffusion-pytorch's floor of 1e-20 (which only sampling, where t = 0 adds no
    # noise, can afford).
    c = _coeffs(config.diffusion, convention="openai")

    @functools.partial(jax.jit, compiler_options=compiler_options())
    def bpd(params, x, key):
        return likelihood.calc_bpd_loop(
            lambda x_t, t: model.apply(params, x_t, t),
            c,
            x,
            key=key,
            mean_type=config.diffusion.objective,
            var_type="fixed_small",
            tails=tails,
        )

    totals, priors, decoders = [], [], []
    for i in range(0, len(images), batch_size):
        res = bpd(
            state.ema_params, jnp.asarray(images[i : i + batch_size]), jax.random.PRNGKey(seed + i)
        )
        totals.append(np.asarray(res.total_bpd))
        priors.append(np.asarray(res.prior_bpd))
        decoders.append(np.asarray(res.vb[:, 0]))
    total = np.concatenate(totals)
    _refuse_nonfinite(total, "the bits/dim", 0 if at_init else int(state.step))
    return {
        "bits_per_dim": float(np.mean(total)),
        "prior_bpd": float(np.mean(np.concatenate(priors))),
        "decoder_bpd": float(np.mean(np.concatenate(decoders))),
        "split": split,
        "images": int(len(images)),
        "step": 0 if at_init else int(state.step),
        "timesteps": config.diffusion.timesteps,
        "tails": tails,
    }
