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
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import checkpoint, data, gaussian, objectives, samplers, train
from jaxdiff import config as config_module
from jaxdiff.compilation import compiler_options
from jaxdiff.config import Config, DataConfig, DiffusionConfig, load_config

# the run's network, re-exported here where training and evaluation look for it
from jaxdiff.networks import (  # noqa: F401
    LabelledUNetModel,
    build_model,
    build_openai_model,
    num_channels,
)

__all__ = [
    "build_coeffs",
    "build_ema",
    "build_model",
    "build_optimizer",
    "model_inputs",
    "grid_png",
    "initial_state",
    "Loaded",
    "load_dataset",
    "loaded",
    "num_channels",
    "resolve_channels",
    "resolve_schedule",
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
        # decoded on demand (data.prefetch in training), never held whole in memory
        return data.ImageFolder(
            cfg.folder,
            cfg.image_size,
            channels=num_channels(cfg),
            split=split,
            test_fraction=cfg.test_fraction,
        )
    raise ValueError(f"unknown dataset {cfg.dataset!r}; choose 'digits' or 'folder'")


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


def build_coeffs(
    cfg: DiffusionConfig, convention: str = "lucidrains", respacing: str | None = None
) -> gaussian.DiffusionCoeffs:
    return objectives.process_coeffs(cfg, convention, respacing)


def build_optimizer(config: Config):
    """The run's optax optimiser: Adam (denoising-diffusion-pytorch's Trainer) or AdamW after
    global-norm clipping, with the learning rate's warm-up and decay (optax schedules) injected
    as a hyperparameter, so that it is logged."""
    import optax

    o, lr = config.optim, config.run.lr
    schedule = lr
    if o.warmup_steps or o.lr_decay != "constant":
        end = lr * o.end_lr_ratio
        decay_steps = o.decay_steps or config.run.steps
        if o.lr_decay == "cosine":
            schedule = optax.warmup_cosine_decay_schedule(
                lr if o.warmup_steps == 0 else 0.0, lr, o.warmup_steps, decay_steps, end
            )
        else:
            warm = optax.linear_schedule(0.0, lr, o.warmup_steps)
            after = (
                optax.constant_schedule(lr)
                if o.lr_decay == "constant"
                else optax.linear_schedule(lr, end, decay_steps - o.warmup_steps)
            )
            schedule = optax.join_schedules([warm, after], [o.warmup_steps])
    if o.optimizer == "adam":
        return train.default_optimizer(schedule, b1=o.b1, b2=o.b2, max_grad_norm=o.max_grad_norm)

    def make(learning_rate):
        adamw = optax.adamw(learning_rate, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay)
        if o.max_grad_norm is None:
            return adamw
        return optax.chain(optax.clip_by_global_norm(o.max_grad_norm), adamw)

    return optax.inject_hyperparams(make)(learning_rate=schedule)


def build_ema(config: Config):
    """ema-pytorch's EMA schedule with the run's settings."""
    o = config.optim
    return train.ema_pytorch_decay(
        beta=o.ema_decay,
        update_every=o.ema_update_every,
        update_after_step=o.ema_update_after_step,
    )


def resolve_schedule(config: Config) -> Config:
    """``config`` with a learning-rate decay's ``decay_steps`` fixed to the run's length when it
    is None (config.json records it, so a longer resumed run decays as the first one did)."""
    o = config.optim
    if o.lr_decay == "constant" or o.decay_steps is not None:
        return config
    steps = max(config.run.steps, o.warmup_steps + 1)
    return dataclasses.replace(config, optim=dataclasses.replace(o, decay_steps=steps))


def model_inputs(config: Config, batch: int = 1) -> dict:
    """Example inputs of the run's network: ``(x, time)`` and its keyword arguments."""
    size = config.data.image_size
    x = jnp.zeros((batch, size, size, num_channels(config.data)))
    kwargs = {}
    if config.model.num_classes is not None:
        kwargs["label"] = jnp.zeros((batch,), jnp.int32)
    return {"args": (x, jnp.zeros((batch,))), "kwargs": kwargs}


def initial_state(config: Config, model, optimizer, mesh):
    key = jax.random.PRNGKey(config.run.seed)
    inputs = model_inputs(config)
    # one compiled init: run op by op, flax's init compiles each of its ~300 ops (18 s here)
    init = jax.jit(model.init)
    params = init(jax.random.fold_in(key, 1), *inputs["args"], **inputs["kwargs"])
    return train.create_train_state(
        params,
        optimizer,
        jax.random.fold_in(key, 2),
        loss_state=objectives.initial_loss_state(config.diffusion),
        mesh=mesh,
    )


def grid_png(images: np.ndarray, path: pathlib.Path, cols: int | None = None) -> None:
    """Save uint8 [N, H, W, C] as one grid PNG with 2-pixel gaps (square-ish, or ``cols``
    images per row)."""
    from PIL import Image

    n, h, w, c = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + 2) + 2, cols * (w + 2) + 2, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        grid[2 + r * (h + 2) : 2 + r * (h + 2) + h, 2 + q * (w + 2) : 2 + q * (w + 2) + w] = img
    scale = max(1, 512 // grid.shape[0])
    pil = Image.fromarray(grid[..., 0] if c == 1 else grid)
    big = pil.resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    big.save(path, format="PNG")


# name -> (sampler factory, default grid); the fast solvers' network calls per step in
# ``samplers.Sampler.calls`` (Heun and DPM-2: 2, minus one on the step to sigma 0)
SOLVERS = {
    "dpmpp-2m": (lambda: samplers.dpm_solver.dpm_solver_multistep(2), "linspace"),
    "dpmpp-3m": (lambda: samplers.dpm_solver.dpm_solver_multistep(3), "linspace"),
    "dpmpp-2m-sde": (lambda: samplers.dpm_solver.dpm_solver_multistep(2, "sde-dpmsolver++"),
                     "linspace"),
    "dpmpp-2s": (lambda: samplers.dpm_solver.dpm_solver_singlestep(2), "linspace"),
    "dpmpp-3s": (lambda: samplers.dpm_solver.dpm_solver_singlestep(3), "linspace"),
    "unipc-bh1": (lambda: samplers.unipc.unipc(3, "bh1"), "linspace"),
    "unipc-bh2": (lambda: samplers.unipc.unipc(2, "bh2"), "linspace"),
    "euler": (lambda: samplers.karras.euler(), "karras"),
    "euler-a": (lambda: samplers.karras.euler_ancestral(), "karras"),
    "heun": (lambda: samplers.karras.heun(), "karras"),
    "dpm2": (lambda: samplers.karras.dpm_2(), "karras"),
    "lms": (lambda: samplers.karras.lms(), "karras"),
}  # fmt: skip
SAMPLERS = ("ddim", "ddpm", *SOLVERS)
assert SAMPLERS == config_module.SAMPLERS, "jaxdiff.config.SAMPLERS lists the same names"


def resolve_steps(config: Config, sampler: str, steps: int | None) -> int:
    """The step count of a sampling run: ``steps``, else 50 for DDIM, T for DDPM, 20 for a
    fast solver (and for the continuous-time sampler, 250; at most T); a ValueError outside
    [1, T]."""
    d = config.diffusion
    if steps is None:
        if sampler in SOLVERS:
            return min(20, d.timesteps)
        if d.loss == "continuous":
            return 250
        return d.timesteps if sampler == "ddpm" else min(50, d.timesteps)
    if not isinstance(steps, int) or not 1 <= steps <= max(d.timesteps, 1):
        raise ValueError(f"steps must be an integer in [1, {d.timesteps}], got {steps!r}")
    return steps


def sampler_name(
    config: Config, sampler: str, steps: int, respacing: str | None = None, grid: str | None = None
) -> str:
    """``ddim50``, ``ddpm1000``, ``ddpm_respaced250``, ``continuous250``, ``dpmpp-2m-linspace20``:
    what ran."""
    if config.diffusion.loss == "continuous" and sampler not in SOLVERS:
        return f"continuous{steps}"
    if respacing is not None:
        return f"{sampler}_respaced{respacing.replace(',', '-')}"
    if sampler in SOLVERS:
        return f"{sampler}-{grid or SOLVERS[sampler][1]}{steps}"
    return f"{sampler}{steps}"


def sampling_var_type(config: Config, var_type: str | None) -> str:
    """The variance that sampling and bits/dim use: the model's own (a learned one, or the
    fixed one it was trained with), or ``var_type`` where a fixed-variance model may use the
    other fixed variance; anything else is a ValueError naming the model's."""
    own = config.diffusion.var_type
    if var_type is None or var_type == own:
        return own
    gaussian.canonical_var_type(var_type)
    learned = ("learned", "learned_range")
    if own in learned:
        raise ValueError(
            f"the model learned its variance ({own!r}); it cannot be sampled or evaluated with "
            f"the fixed variance {var_type!r}: leave --var-type out"
        )
    if var_type in learned:
        raise ValueError(
            f"the model was trained with the fixed variance {own!r}; it has no learned variance "
            f"to use for {var_type!r}: pass --var-type fixed_small or fixed_large"
        )
    return var_type


def check_labels(config: Config, labels, guidance_scale: float | None) -> None:
    """A clear ValueError for labels a model cannot take (see :func:`sample_fn`)."""
    num_classes = config.model.num_classes
    if num_classes is None:
        if labels is not None:
            raise ValueError(
                "this model is unconditional (trained without --num-classes): it takes no class "
                "labels; leave --class out"
            )
        if guidance_scale is not None:
            raise ValueError("classifier-free guidance needs a class-conditional model")
        return
    if labels is None:
        raise ValueError(
            f"this model is class-conditional ({num_classes} classes): give the classes to "
            f"sample (--class N, or --class all for a grid with one row per class)"
        )
    labels = np.asarray(labels)
    integers = np.issubdtype(labels.dtype, np.integer)
    if not integers or labels.min() < -1 or labels.max() >= num_classes:
        raise ValueError(
            f"class labels must be integers in [0, {num_classes}) (or -1, the null class), got "
            f"{np.unique(labels).tolist()[:10]}"
        )
    if guidance_scale is not None and guidance_scale != 1 and config.model.cond_drop_prob == 0:
        raise ValueError(
            f"guidance scale {guidance_scale} needs a model trained with label dropout; this one "
            "has cond_drop_prob 0, so its null class was never trained: use --guidance-scale 1"
        )


def sample_fn(
    config: Config,
    model,
    num: int,
    steps: int,
    eta: float,
    sampler: str,
    *,
    respacing: str | None = None,
    var_type: str | None = None,
    guidance_scale: float | None = None,
    rescaled_phi: float = 0.0,
    remove_parallel_component: bool = True,
    grid: str | None = None,
    on_call: Callable[[], None] | None = None,
    classifier: tuple[Callable, float, int] | None = None,
):
    """A jitted ``run(params, key, first=0, labels=None, classifier_params=None) -> [num, H,
    W, C]`` sampler of the run's process; ``run.calls`` is its number of network calls (one
    per step for DDPM, DDIM and the continuous sampler; ``Sampler.calls`` per step for a
    fast solver), and ``on_call()``, when given, runs on the host after each of them (a
    progress bar; it keeps the program out of the persistent compilation cache).

    ``sampler`` is ``"ddim"``, ``"ddpm"`` or a fast solver of :data:`SOLVERS` (DPM-Solver++,
    UniPC, the Karras samplers), which runs ``steps`` steps of the grid ``grid`` (default: the
    solver's, linspace timesteps or Karras sigmas) with x0 clipped to [-1, 1] as DDIM does.

    The process is the trained one: its objective and variance (a learned variance, or the
    fixed one; ``var_type`` may swap fixed_small and fixed_large), and for a continuous-time
    model its ancestral sampler over ``steps`` steps. ``"ddim"`` runs DDIM over ``steps``
    steps of the table (eta); ``"ddpm"`` runs ancestral sampling over the chain respaced to
    ``steps`` steps (improved-diffusion's ``timestep_respacing="<steps>"``; all T when
    ``steps`` = T); ``respacing`` (``"ddim50"``, ``"250"``, ``"10,15,20"``) respaces the
    chain explicitly and either sampler then visits every step of it. A class-conditional
    model takes ``labels`` [num] (-1: the null class; default: class j mod K for sample j),
    with classifier-free guidance at ``guidance_scale`` (denoising-diffusion-pytorch's
    ``cond_scale``: 1 is the conditional model, and the two halves run as one batched call)
    and ``rescaled_phi``; ``remove_parallel_component`` (the reference's default) drops the
    part of the guidance update parallel to the conditional output.

    Sample j of the whole set (``first`` is the index of this batch's first sample) starts from
    the noise ``normal(fold_in(key, j))``, so a deterministic sampler (DDIM with eta 0) gives
    each sample the same value in any batch size; the noise added along the way (DDPM, eta > 0)
    is drawn per batch from ``fold_in(key, -1 - first)``.

    ``classifier`` = ``(apply_fn, scale, num_classes)`` guides the model (class-conditional
    or not) towards ``labels`` (default: class j mod ``num_classes``) with a noisy classifier
    ``apply_fn(classifier_params, x, time) -> logits`` (Dhariwal & Nichol 2021:
    :func:`jaxdiff.guidance.classifier_cond_fn`, the labels' log-probability gradient times
    ``scale``), as guided-diffusion's ``classifier_sample.py``."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {list(SAMPLERS)}")
    if grid is not None and sampler not in SOLVERS:
        raise ValueError(
            f"--grid applies to the fast solvers ({', '.join(SOLVERS)}), not {sampler}"
        )
    d = config.diffusion
    var_type = sampling_var_type(config, var_type)
    size, channels = config.data.image_size, num_channels(config.data)
    conditional = config.model.num_classes is not None
    if guidance_scale is not None:
        check_labels(config, np.zeros(1, np.int32) if conditional else None, guidance_scale)
    continuous_time = d.loss == "continuous"
    if continuous_time and respacing is not None:
        raise ValueError("respacing is a discrete-time option; this model is continuous-time")
    solver = None
    if sampler in SOLVERS:
        if respacing is not None:
            raise ValueError("--respacing applies to ddim and ddpm; a fast solver takes --grid")
        if d.objective == "prev_x":
            raise ValueError(
                f"a previous-x network (objective prev_x) samples on its table's own steps: "
                f"use --sampler ddpm or ddim, not {sampler}"
            )
        factory, default_grid = SOLVERS[sampler]
        solver = factory()
        process = (samplers.Continuous(objectives.log_snr_fn_of(d)) if continuous_time
                   else objectives.process_coeffs(d, None, None))  # fmt: skip
        grid_kind = grid or default_grid
        if continuous_time and grid_kind not in ("linspace", "karras", "exponential"):
            raise ValueError(f"a continuous-time model has no {grid_kind!r} grid")
        if grid_kind in ("karras", "exponential"):
            # EDM's sigma_max = 80 at most (Karras et al. 2022, Table 1): from a cosine table's
            # 2e4 a 10-step Karras grid spends its steps where the image is still noise
            lo, hi = process.sigma_range() if isinstance(process, samplers.Continuous) else (
                samplers.Discrete(process).sigma_range())  # fmt: skip
            solver_grid = samplers.make_grid(process, steps, grid_kind, sigma_max=min(hi, 80.0),
                                             round_t=False)  # fmt: skip
        else:
            solver_grid = samplers.make_grid(process, steps, grid_kind)
    if sampler == "ddpm" and respacing is None and steps != d.timesteps:
        respacing = str(steps)
    c = None if continuous_time else objectives.process_coeffs(d, None, respacing)
    learned = var_type in ("learned", "learned_range")
    if classifier is not None and continuous_time:
        raise ValueError("classifier guidance is defined here for discrete-time models")
    options = {"mean_type": d.objective, "var_type": var_type}
    options["self_condition"] = config.model.self_condition

    @functools.partial(jax.jit, compiler_options=compiler_options())
    def run(params, key, first=0, labels=None, classifier_params=None):
        rows = jnp.asarray(first, jnp.int32) + jnp.arange(num, dtype=jnp.int32)
        x_T = jax.vmap(
            lambda j: jax.random.normal(jax.random.fold_in(key, j), (size, size, channels))
        )(rows)

        def model_fn(x, t, **kwargs):
            out = model.apply(params, x, t, **kwargs)
            if on_call is not None:
                jax.debug.callback(on_call, ordered=False)
            return out

        if conditional or classifier is not None:
            # default: sample j of the set has class j mod K (every class equally often)
            k = config.model.num_classes if conditional else classifier[2]
            y = jnp.asarray(rows % k if labels is None else labels, jnp.int32)
        if conditional:
            if guidance_scale is None or guidance_scale == 1:
                fn = functools.partial(model_fn, label=y)
            else:
                fn = samplers.guided_model_fn(
                    model_fn,
                    guidance_scale,
                    {"label": y},
                    {"label": jnp.full_like(y, -1)},
                    channels if learned else None,
                    rescaled_phi=rescaled_phi,
                    remove_parallel_component=remove_parallel_component,
                    batched=True,
                )
        else:
            fn = model_fn
        cond_fn = None
        if classifier is not None:
            apply_classifier, scale, _ = classifier
            guide = samplers.classifier_cond_fn(
                lambda x, t: apply_classifier(classifier_params, x, t), scale
            )
            cond_fn = functools.partial(guide, y=y)

        # uint32 data: -1 - first wraps to 2**32 - 1 - first, apart from every row index j
        noise_key = jax.random.fold_in(key, jnp.uint32(2**32 - 1) - jnp.uint32(first))
        if solver is not None:
            denoiser = samplers.make_denoiser(
                fn, process, prediction=d.objective, learned_variance=learned,
                clip_denoised=True, self_condition=config.model.self_condition,
                cond_fn=cond_fn,
            )  # fmt: skip
            out = samplers.sample(solver, denoiser, x_T, solver_grid, key=noise_key)
        elif continuous_time:
            from jaxdiff import continuous

            out = continuous.continuous_sample(
                fn,
                x_T,
                log_snr_fn=objectives.log_snr_fn_of(d),
                num_steps=steps,
                objective=d.objective,
                key=noise_key,
            )
        elif sampler == "ddpm":
            out = samplers.ddpm_sample(fn, c, x_T, key=noise_key, cond_fn=cond_fn, **options)
        else:
            count = steps if respacing is None else c.num_timesteps
            grid = samplers.ddim_grid(c.num_timesteps, count)
            out = samplers.ddim_sample(
                fn, c, x_T, grid=grid, eta=eta, key=noise_key, cond_fn=cond_fn, **options
            )
        return out.sample

    if solver is not None:
        run.calls = steps * solver.calls
    elif continuous_time or respacing is None:
        run.calls = steps
    else:
        run.calls = c.num_timesteps
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
    optimizer = build_optimizer(config)
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


class Loaded(NamedTuple):
    """A network ready to sample or evaluate: its run configuration, the module, the weights
    (Flax variables) and the training step they come from (0 for imported weights)."""

    config: Config
    model: Any
    params: Any
    step: int


def loaded(source, step: int | None = None, *, at_init: bool = False) -> Loaded:
    """``source`` itself when it is a :class:`Loaded` (e.g. an imported openai checkpoint,
    :mod:`jaxdiff.pretrained`), else the EMA weights of a workdir's checkpoint (see
    :func:`restored`)."""
    if isinstance(source, Loaded):
        return source
    config, model, state = restored(source, step, at_init=at_init)
    return Loaded(config, model, state.ema_params, int(state.step))


def other_steps(workdir, state) -> str:
    others = [s for s in checkpoint.all_steps(workdir) if s != int(state.step)]
    return f"; the workdir has steps {others}" if others else ""


def refuse_nonfinite(values, what: str, step: int) -> None:
    if not np.isfinite(np.asarray(values)).all():
        raise ValueError(
            f"{what} of the checkpoint of step {step} are NaN or infinite, so nothing was "
            "written; the model is broken at that step: try an earlier one (--step N)"
        )
