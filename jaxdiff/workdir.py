"""What a workdir's configuration builds, shared by training and evaluation: the dataset, the
network, the process's coefficients, the initial state, the sampler; restoring a checkpoint;
writing files atomically; sample grids."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import pathlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import checkpoint, data, gaussian, samplers, schedules, train
from jaxdiff.compilation import compiler_options
from jaxdiff.config import Config, DataConfig, DiffusionConfig, load_config
from jaxdiff.models import Unet

__all__ = [
    "build_coeffs",
    "build_model",
    "grid_png",
    "initial_state",
    "load_dataset",
    "num_channels",
    "resolve_channels",
    "refuse_nonfinite",
    "restored",
    "sample_fn",
    "to_uint8",
    "write_atomic",
]


def load_dataset(cfg: DataConfig, split: str):
    if cfg.dataset == "digits":
        return data.load_digits(cfg.image_size, split=split)
    if cfg.dataset == "folder":
        if not cfg.folder:
            raise ValueError("dataset 'folder' needs a folder (--data-dir)")
        if split != "all":
            raise ValueError(
                f"an image folder has no held-out {split!r} split: pass --split all, which "
                "measures the training images themselves"
            )
        return data.ImageFolder(cfg.folder, cfg.image_size, channels=num_channels(cfg)).load()
    raise ValueError(f"unknown dataset {cfg.dataset!r}; choose 'digits' or 'folder'")


def num_channels(cfg: DataConfig) -> int:
    """The run's channel count: 1 for digits, else ``cfg.channels`` or, when that is None, the
    folder's (see :func:`resolve_channels`)."""
    if cfg.dataset == "digits":
        return 1
    if cfg.channels is None:
        return data.ImageFolder(cfg.folder, cfg.image_size, channels=None).channels
    return cfg.channels


def resolve_channels(config: Config) -> tuple[Config, str | None]:
    """``config`` with ``data.channels`` filled in (1 for digits; a folder's from its images),
    and a warning when an explicit count converts the images (RGB files read as grayscale, or
    grayscale ones repeated into 3 channels), else None."""
    cfg = config.data
    if cfg.dataset == "digits":
        if cfg.channels not in (None, 1):
            raise ValueError(f"the digits are grayscale: channels must be 1, got {cfg.channels}")
        channels, note = 1, None
    elif cfg.dataset == "folder" and cfg.folder:
        folder = data.ImageFolder(cfg.folder, cfg.image_size, channels=cfg.channels)
        channels, note = folder.channels, None
        modes = ", ".join(f"{n} {m}" for m, n in sorted(folder.modes.items()))
        if folder.channels != folder.detected_channels:
            kind = "RGB" if folder.detected_channels == 3 else "grayscale"
            to = "grayscale" if channels == 1 else "RGB (the gray value in all 3 channels)"
            note = (
                f"warning: {cfg.folder} holds {kind} images ({modes}); --channels {channels} "
                f"converts them to {to}"
            )
    else:
        return config, None  # load_dataset names the problem
    data_cfg = dataclasses.replace(cfg, channels=channels)
    return dataclasses.replace(config, data=data_cfg), note


def build_model(config: Config) -> Unet:
    m = config.model
    return Unet(
        dim=m.dim,
        dim_mults=tuple(m.dim_mults),
        channels=num_channels(config.data),
        dropout=m.dropout,
        attn_heads=m.attn_heads,
        attn_dim_head=m.attn_dim_head,
        dtype=None if m.dtype == "float32" else m.dtype,
        remat=m.remat,
    )


def build_coeffs(cfg: DiffusionConfig, convention: str = "lucidrains") -> gaussian.DiffusionCoeffs:
    betas = schedules.get_named_beta_schedule(cfg.schedule, cfg.timesteps)
    return gaussian.make_coeffs(betas, convention=convention)


def initial_state(config: Config, model: Unet, optimizer, mesh):
    key = jax.random.PRNGKey(config.run.seed)
    size = config.data.image_size
    x = jnp.zeros((1, size, size, num_channels(config.data)))
    params = model.init(jax.random.fold_in(key, 1), x, jnp.zeros((1,)))
    return train.create_train_state(params, optimizer, jax.random.fold_in(key, 2), mesh=mesh)


def grid_png(images: np.ndarray, path: pathlib.Path) -> None:
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


def sample_fn(config: Config, model: Unet, num: int, steps: int, eta: float, sampler: str):
    """A jitted ``run(params, key, first=0) -> [num, H, W, C]`` sampler of the run's process.

    Sample j of the whole set (``first`` is the index of this batch's first sample) starts from
    the noise ``normal(fold_in(key, j))``, so a deterministic sampler (DDIM with eta 0) gives
    each sample the same value in any batch size; the noise added along the way (DDPM, eta > 0)
    is drawn per batch from ``fold_in(key, -1 - first)``."""
    c = build_coeffs(config.diffusion)
    size, channels = config.data.image_size, num_channels(config.data)
    objective = config.diffusion.objective

    @functools.partial(jax.jit, compiler_options=compiler_options())
    def run(params, key, first=0):
        rows = jnp.asarray(first, jnp.int32) + jnp.arange(num, dtype=jnp.int32)
        x_T = jax.vmap(
            lambda j: jax.random.normal(jax.random.fold_in(key, j), (size, size, channels))
        )(rows)

        def model_fn(x, t):
            return model.apply(params, x, t)

        # uint32 data: -1 - first wraps to 2**32 - 1 - first, apart from every row index j
        noise_key = jax.random.fold_in(key, jnp.uint32(2**32 - 1) - jnp.uint32(first))
        if sampler == "ddpm":
            out = samplers.ddpm_sample(model_fn, c, x_T, key=noise_key, mean_type=objective)
        else:
            grid = samplers.ddim_grid(c.num_timesteps, steps)
            out = samplers.ddim_sample(
                model_fn, c, x_T, grid=grid, eta=eta, key=noise_key, mean_type=objective
            )
        return out.sample

    return run


def to_uint8(x) -> np.ndarray:
    return data.to_uint8(np.asarray(x))


def write_atomic(path: pathlib.Path, write: Callable[[pathlib.Path], None]) -> None:
    """``write(tmp)`` then rename over ``path``: a full disk or a kill never leaves a truncated
    file where a good one was."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def restored(
    workdir: str | os.PathLike, step: int | None, *, finite: bool = True, at_init: bool = False
):
    """``(config, model, state)`` of a workdir's checkpoint (``step``, default the newest),
    refusing non-finite EMA parameters when ``finite``; with ``at_init``, the untrained state
    of the same configuration instead (step 0)."""
    config = load_config(workdir)
    model = build_model(config)
    optimizer = train.default_optimizer(config.run.lr)
    if at_init:
        return config, model, initial_state(config, model, optimizer, None)
    like = jax.eval_shape(lambda: initial_state(config, model, optimizer, None))
    state = checkpoint.restore(workdir, like, step=step, config=config.identity())
    bad = train.nonfinite_leaves(state.ema_params) if finite else []
    if bad:
        raise ValueError(
            f"the checkpoint of step {int(state.step)} in {str(workdir)!r} holds NaN or "
            f"infinite EMA parameters ({len(bad)} arrays, e.g. {bad[0]}): the run diverged "
            f"before it was saved. Use an earlier step (--step N){other_steps(workdir, state)}."
        )
    return config, model, state


def other_steps(workdir, state) -> str:
    others = [s for s in checkpoint.all_steps(workdir) if s != int(state.step)]
    return f"; the workdir has steps {others}" if others else ""


def refuse_nonfinite(values, what: str, step: int) -> None:
    if not np.isfinite(np.asarray(values)).all():
        raise ValueError(
            f"{what} of the checkpoint of step {step} are NaN or infinite, so nothing was "
            "written; the model is broken at that step: try an earlier one (--step N)"
        )
