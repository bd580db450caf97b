"""The sampler API: a process, a denoiser built once from a network, a grid, one scan driver.

* A **process** says where a point of time sits: :class:`Discrete` (a coefficient table, time =
  the table index) or :class:`Continuous` (a log-SNR function of t in [0, 1]).
* A :class:`Denoiser` wraps ``model_fn(x_t, time, **cond)`` with the process, the prediction
  type (eps, x0 or v), a learned-variance output, clipping or dynamic thresholding, score
  guidance and self-conditioning, and gives eps and x0 at any (t, alpha, sigma).
* A :class:`Grid` holds the points a sampler visits: the process time t, alpha and sigma of
  each point (x_t = alpha x0 + sigma eps), and the step count, possibly traced, with padding.
* A :class:`Sampler` is a public ``init(x_T, grid) -> state`` / ``step(denoise, state, grid, i,
  z) -> (state, x0)`` pair; :func:`sample` drives any of them with one ``lax.scan``.

Every sampler works on the variance-preserving x (the network's input); the Karras samplers
convert to k-diffusion's x / alpha inside their step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import gaussian
from jaxdiff.gaussian import DiffusionCoeffs

__all__ = [
    "Continuous",
    "Denoised",
    "Denoiser",
    "Discrete",
    "Grid",
    "SampleOutput",
    "Sampler",
    "noise_source",
    "sample",
]

PREDICTIONS = {"eps": "eps", "epsilon": "eps", "x0": "x0", "sample": "x0", "x_start": "x0",
               "pred_x0": "x0", "v": "v", "v_prediction": "v", "pred_noise": "eps",
               "pred_v": "v"}  # fmt: skip


def _static(value, kind=int):
    """``kind(value)`` for a Python or concrete value; None for a traced one."""
    try:
        return kind(value)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return None


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Discrete:
    """A discrete process: time t is an index of the coefficient table ``c`` (fractional t
    interpolates; t = -1 is the clean image). The network gets ``c.model_times[t]``."""

    c: DiffusionCoeffs
    quantize: bool = False  # t_of_sigma gives the nearest timestep (k-diffusion's quantize)

    def alpha_sigma(self, t):
        """From the table at an integer t; between two timesteps, k-diffusion's sigma
        (sigma / alpha) interpolated linearly (diffusers' ``np.interp`` of its sigmas)."""
        t = jnp.asarray(t, jnp.float32)
        n = self.c.num_timesteps
        ti = jnp.clip(t, 0, n - 1).astype(jnp.int32)
        alpha = self.c.sqrt_alphas_cumprod[ti]
        sigma = self.c.sqrt_one_minus_alphas_cumprod[ti]
        s_table = self.c.sqrt_one_minus_alphas_cumprod / self.c.sqrt_alphas_cumprod
        s = jnp.interp(t, jnp.arange(n, dtype=jnp.float32), s_table)
        between = t != jnp.floor(t)
        alpha = jnp.where(between, jax.lax.rsqrt(1.0 + s**2), alpha)
        sigma = jnp.where(between, s * jax.lax.rsqrt(1.0 + s**2), sigma)
        clean = t < 0
        return jnp.where(clean, 1.0, alpha), jnp.where(clean, 0.0, sigma)

    def model_time(self, t):
        index = jnp.arange(self.c.num_timesteps, dtype=jnp.float32)
        return jnp.interp(jnp.asarray(t, jnp.float32), index, self.c.model_times)

    def log_sigmas(self):
        """log of the table's k-diffusion sigmas sqrt((1 - abar) / abar), increasing in t."""
        abar = self.c.alphas_cumprod
        return jnp.log(jnp.sqrt((1 - abar) / abar))

    def t_of_sigma(self, sigma_ve):
        """k-diffusion's ``sigma_to_t``: the fractional index where log sigma falls in the
        table, linear in log sigma between neighbours, clamped to [0, T - 1]."""
        log_sigmas = self.log_sigmas()
        log_sigma = jnp.log(jnp.maximum(sigma_ve, 1e-30))
        if self.quantize:
            shape = jnp.shape(log_sigma)
            dists = jnp.abs(jnp.reshape(log_sigma, (-1, 1)) - log_sigmas[None, :])
            return jnp.argmin(dists, axis=-1).astype(jnp.float32).reshape(shape)
        n = log_sigmas.shape[0]
        low = jnp.clip(jnp.searchsorted(log_sigmas, log_sigma, side="right") - 1, 0, n - 2)
        lo, hi = log_sigmas[low], log_sigmas[low + 1]
        w = jnp.clip((lo - log_sigma) / (lo - hi), 0.0, 1.0)
        low = low.astype(jnp.float32)
        return (1 - w) * low + w * (low + 1)

    def sigma_range(self) -> tuple[float, float]:
        s = np.sqrt((1 - np.asarray(self.c.alphas_cumprod)) / np.asarray(self.c.alphas_cumprod))
        return float(s[0]), float(s[-1])


@dataclasses.dataclass(frozen=True)
class Continuous:
    """A continuous process: time t in [0, 1], ``log_snr_fn(t)`` decreasing; the network gets
    the log-SNR as its time input (denoising-diffusion-pytorch's continuous-time classes)."""

    log_snr_fn: Callable[[jnp.ndarray], jnp.ndarray]

    def alpha_sigma(self, t):
        lam = self.log_snr_fn(jnp.asarray(t, jnp.float32))
        return jnp.sqrt(jax.nn.sigmoid(lam)), jnp.sqrt(jax.nn.sigmoid(-lam))

    def model_time(self, t):
        return self.log_snr_fn(jnp.asarray(t, jnp.float32))

    def t_of_sigma(self, sigma_ve):
        """The t with log-SNR -2 log sigma, by 40 bisection steps on [0, 1]."""
        target = -2.0 * jnp.log(jnp.maximum(sigma_ve, 1e-30))

        def body(_, bounds):
            lo, hi = bounds
            mid = 0.5 * (lo + hi)
            above = self.log_snr_fn(mid) > target  # still too clean: move right
            return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

        lo, hi = jax.lax.fori_loop(0, 40, body, (jnp.zeros_like(target), jnp.ones_like(target)))
        return 0.5 * (lo + hi)

    def sigma_range(self) -> tuple[float, float]:
        """The sigmas of t = 0 and t = 1, the largest capped at 500 (log-SNR -12.4): the
        Karras samplers' x / alpha loses the signal in float32 beyond that (the cosine
        schedule reaches 2e7)."""
        lam = np.asarray(self.log_snr_fn(jnp.asarray([1.0, 0.0], jnp.float32)), np.float64)
        return float(np.exp(-lam[1] / 2)), float(min(np.exp(-lam[0] / 2), 500.0))


Process = Discrete | Continuous


def as_process(process) -> Process:
    if isinstance(process, Discrete | Continuous):
        return process
    if isinstance(process, DiffusionCoeffs):
        return Discrete(process)
    if callable(process):
        return Continuous(process)
    raise TypeError(
        f"process must be a DiffusionCoeffs table, a log-SNR function or a samplers.Discrete / "
        f"Continuous, got {type(process).__name__}"
    )


# --------------------------------------------------------------------------------------------
# The denoiser
# --------------------------------------------------------------------------------------------


class Denoised(NamedTuple):
    """A denoiser's prediction at one point: eps and x0 (processed), and the raw output."""

    eps: jnp.ndarray
    x0: jnp.ndarray
    out: jnp.ndarray


def dynamic_threshold(x0: jnp.ndarray, ratio: float = 0.995, max_value: float = 1.0):
    """Imagen's dynamic thresholding (Saharia et al. 2022, Sec. 2.3; diffusers'
    ``_threshold_sample``): s = clamp(quantile(|x0|, ratio), 1, max_value) per sample, then
    x0 = clamp(x0, -s, s) / s."""
    flat = jnp.abs(x0.reshape(x0.shape[0], -1)).astype(jnp.float32)
    s = jnp.clip(jnp.quantile(flat, ratio, axis=1), 1.0, max_value)
    s = s.reshape((-1,) + (1,) * (x0.ndim - 1)).astype(x0.dtype)
    return jnp.clip(x0, -s, s) / s


@dataclasses.dataclass(frozen=True)
class Denoiser:
    """A network and its process: eps and x0 predictions at any point (t, alpha, sigma).

    Build it with :func:`make_denoiser`. Calling it, ``denoiser(x, t, alpha, sigma,
    x0_prev)``, evaluates the network once at ``x`` (the variance-preserving x_t, [B, ...,
    C]) with time ``process.model_time(t)`` and returns :class:`Denoised`.
    """

    model_fn: Callable[..., jnp.ndarray]
    process: Process
    prediction: str = "eps"
    learned_variance: bool = False
    clip_denoised: bool = False
    thresholding: tuple[float, float] | None = None
    denoised_fn: Callable[[jnp.ndarray], jnp.ndarray] | None = None
    cond_fn: Callable[..., jnp.ndarray] | None = None
    self_condition: bool = False
    model_kwargs: Any = None
    rederive_eps: bool | None = None

    def raw(self, x, t, x0_prev=None) -> tuple[jnp.ndarray, jnp.ndarray]:
        """``(network output, time input)`` at x and process time t."""
        time = jnp.broadcast_to(self.process.model_time(t), x.shape[:1])
        kwargs = dict(self.model_kwargs or {})
        if self.self_condition:
            kwargs["x_self_cond"] = jnp.zeros_like(x) if x0_prev is None else x0_prev
        return self.model_fn(x, time, **kwargs), time

    def __call__(self, x, t, alpha, sigma, x0_prev=None) -> Denoised:
        if self.prediction == "prev_x" and not isinstance(self.process, Discrete):
            raise ValueError(
                "a previous-x network (mean_type 'prev_x') predicts x_{t-1} of a coefficient "
                "table; it has no prediction on a continuous-time process"
            )
        out, time = self.raw(x, t, x0_prev)
        mean_out = out
        if self.learned_variance:
            mean_out = gaussian.split_model_output(out, x, "learned_range")[0]
        elif out.shape != x.shape:
            raise ValueError(
                f"model output has shape {tuple(out.shape)}, expected {tuple(x.shape)}; a "
                f"network with a learned variance (2C channels) needs learned_variance=True"
            )
        alpha, sigma = (jnp.asarray(a, x.dtype) for a in (alpha, sigma))
        if self.prediction == "prev_x":
            # x0 from the posterior mean of table step t (improved-diffusion's
            # _predict_xstart_from_xprev), eps from that x0, as its ddim_sample does
            step = jnp.broadcast_to(jnp.round(t).astype(jnp.int32), x.shape[:1])
            x0 = gaussian.predict_x0_from_xprev(self.process.c, x, step, mean_out)
            eps = (x - alpha * x0) / sigma
        elif self.prediction == "eps":
            eps, x0 = mean_out, (x - sigma * mean_out) / alpha
        elif self.prediction == "x0":
            eps, x0 = (x - alpha * mean_out) / sigma, mean_out
        else:
            eps, x0 = sigma * x + alpha * mean_out, alpha * x - sigma * mean_out
        processed = self.clip_denoised or self.thresholding or self.denoised_fn is not None
        if self.denoised_fn is not None:
            x0 = self.denoised_fn(x0)
        if self.thresholding is not None:
            x0 = dynamic_threshold(x0, *self.thresholding)
        if self.clip_denoised:
            x0 = jnp.clip(x0, -1.0, 1.0)
        if self.rederive_eps or (processed and self.rederive_eps is None):
            eps = (x - alpha * x0) / sigma
        if self.cond_fn is not None:
            # score guidance (guided-diffusion condition_score): eps moves against the
            # classifier gradient, x0 follows it
            grad = self.cond_fn(x, time, **(self.model_kwargs or {}))
            eps = eps - sigma * grad
            x0 = (x - sigma * eps) / alpha
        return Denoised(eps, x0, out)

    def at_sigma(self, x, sigma_ve, x0_prev=None) -> Denoised:
        """The prediction at k-diffusion noise level ``sigma_ve`` (sigma / alpha): the network
        sees x with alpha = 1 / sqrt(1 + sigma_ve^2) and the process time of that level."""
        alpha = jax.lax.rsqrt(1.0 + sigma_ve**2)
        return self(x, self.process.t_of_sigma(sigma_ve), alpha, sigma_ve * alpha, x0_prev)


def make_denoiser(
    model_fn: Callable[..., jnp.ndarray],
    process,
    *,
    prediction: str = "eps",
    learned_variance: bool = False,
    clip_denoised: bool = False,
    thresholding: bool | tuple[float, float] = False,
    denoised_fn: Callable[[jnp.ndarray], jnp.ndarray] | None = None,
    cond_fn: Callable[..., jnp.ndarray] | None = None,
    self_condition: bool = False,
    model_kwargs: dict | None = None,
    rederive_eps: bool | None = None,
) -> Denoiser:
    """A :class:`Denoiser` of ``model_fn`` for ``process`` (a ``DiffusionCoeffs`` table, a
    log-SNR function, or :class:`Discrete` / :class:`Continuous`).

    Args:
      prediction: what the network predicts: ``"eps"``, ``"x0"`` or ``"v"`` (aliases:
        ``epsilon``, ``sample``, ``v_prediction``, ``pred_noise``, ``pred_x0``, ``pred_v``).
      learned_variance: the network outputs 2C channels (mean, then variance); samplers other
        than DDPM use only the mean part.
      clip_denoised: clip x0 to [-1, 1]; ``thresholding``: dynamic thresholding, True for
        (ratio 0.995, max 1) or a ``(ratio, max_value)`` pair.
      rederive_eps: None (default) re-derives eps from a processed x0; True always (as
        improved-diffusion's DDIM); False never (diffusers' DDIM without
        ``use_clipped_model_output``).
      cond_fn: ``cond_fn(x, time, **model_kwargs)`` = grad_x log p(y | x), score guidance.
      self_condition: pass the previous x0 as ``x_self_cond``.
    """
    key = prediction.lower() if isinstance(prediction, str) else prediction
    if key in ("prev_x", "previous_x", "pred_xprev"):
        key = "prev_x"
    elif key not in PREDICTIONS:
        raise ValueError(
            f"unknown prediction type {prediction!r}; choose one of "
            f"{sorted(set(PREDICTIONS.values()))} (aliases: "
            f"{sorted(k for k in PREDICTIONS if k not in PREDICTIONS.values())}); the "
            "previous-x mean type ('prev_x') is sampled on the table's steps (ddpm, ddim)"
        )
    if thresholding is True:
        thresholding = (0.995, 1.0)
    elif thresholding is False:
        thresholding = None
    return Denoiser(
        model_fn=model_fn,
        process=as_process(process),
        prediction=PREDICTIONS.get(key, key),
        learned_variance=learned_variance,
        clip_denoised=clip_denoised,
        thresholding=None if thresholding is None else tuple(map(float, thresholding)),
        denoised_fn=denoised_fn,
        cond_fn=cond_fn,
        self_condition=self_condition,
        model_kwargs=model_kwargs,
        rederive_eps=rederive_eps,
    )


# --------------------------------------------------------------------------------------------
# Grids
# --------------------------------------------------------------------------------------------


class Grid(NamedTuple):
    """The points a sampler visits: step i goes from point i to point i + 1.

    ``t`` is the process time of each point (table index or continuous t), ``alpha`` and
    ``sigma`` its coefficients (x = alpha x0 + sigma eps; the clean end has alpha 1, sigma
    0). Arrays have L + 1 entries for L padded steps; steps [0, num_steps) run. ``num_steps``
    is a Python int (the scan then has exactly that many iterations) or a traced int32
    (entries past it are padding and are skipped).
    """

    t: jnp.ndarray  # [L + 1] float32
    alpha: jnp.ndarray  # [L + 1]
    sigma: jnp.ndarray  # [L + 1]
    num_steps: Any  # int or traced int32 scalar

    @property
    def length(self) -> int:
        return self.t.shape[0] - 1

    @property
    def log_alpha_sigma(self):
        """lambda = log alpha - log sigma at each point (+inf at a clean end)."""
        return jnp.log(self.alpha) - jnp.log(self.sigma)

    @property
    def sigma_ve(self):
        """k-diffusion's sigma / alpha at each point."""
        return self.sigma / self.alpha


def check_grid(grid: Grid, what: str, reverse: bool = False) -> None:
    """Refuse a grid whose noise level does not decrease (increase, for ``reverse``), checked
    when the grid is concrete."""
    try:
        s = np.asarray(grid.sigma_ve, np.float64)
        n = int(grid.num_steps)
    except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return
    if not 1 <= n <= grid.length:
        raise ValueError(f"{what}: num_steps must be in [1, {grid.length}], got {n}")
    s = s[: n + 1]
    if not np.all(np.isfinite(s)) or np.any(s < 0):
        raise ValueError(f"{what}: the grid's sigmas must be finite and >= 0, got {s}")
    wrong = np.diff(s) <= 0 if reverse else np.diff(s) >= 0
    if np.any(wrong):
        bad = int(np.argmax(wrong))
        raise ValueError(
            f"{what}: the noise level must {'increase' if reverse else 'decrease'} along the "
            f"grid, but point {bad + 1} (sigma {s[bad + 1]:.6g}) does not "
            f"{'exceed' if reverse else 'fall below'} point {bad} (sigma {s[bad]:.6g})"
        )


def _pad_to(a, length: int):
    a = jnp.asarray(a)
    if a.shape[0] == length:
        return a
    return jnp.concatenate([a, jnp.broadcast_to(a[-1], (length - a.shape[0],))])


def timestep_grid(process, timesteps, *, final: str = "zero", max_steps: int | None = None):
    """A grid through the table's timesteps (descending), then a final point.

    ``final``: ``"zero"`` ends at the clean image (sigma 0; diffusers' ``final_sigmas_type=
    "zero"``), ``"sigma_min"`` at the table's first timestep (its smallest noise; diffusers'
    ``"sigma_min"``), ``"none"`` uses the last timestep given as the end point. ``max_steps``
    pads the arrays so that grids of several step counts share one compiled sampler.
    """
    process = as_process(process)
    ts = np.asarray(timesteps, np.float64)
    if ts.ndim != 1 or ts.size < 1:
        raise ValueError(f"timesteps must be a non-empty 1-D array, got shape {ts.shape}")
    if final == "zero":
        ts = np.append(ts, -1.0)
    elif final == "sigma_min":
        ts = np.append(ts, 0.0)
    elif final != "none":
        raise ValueError(f"unknown final point {final!r}; choose 'zero', 'sigma_min' or 'none'")
    n = ts.size - 1
    t = jnp.asarray(ts, jnp.float32)
    alpha, sigma = process.alpha_sigma(t)
    return _finish_grid(Grid(t, alpha, sigma, n), max_steps, "timestep_grid")


def sigma_grid(
    process, sigmas, *, t=None, round_t: bool = False, max_steps: int | None = None
) -> Grid:
    """A grid through k-diffusion noise levels ``sigmas`` (sigma / alpha, decreasing; a final
    0 is the clean image): alpha = 1 / sqrt(1 + s^2), sigma = s alpha, and the process time
    of each level: k-diffusion's ``sigma_to_t`` (``round_t`` rounds it to an integer
    timestep, as diffusers' DPM-Solver and UniPC do with Karras sigmas), or ``t`` given for
    the levels before the last (a scheduler's own timesteps)."""
    process = as_process(process)
    s = jnp.asarray(np.asarray(sigmas, np.float64), jnp.float32)
    if s.ndim != 1 or s.shape[0] < 2:
        raise ValueError(f"sigmas must be a 1-D array of at least 2 levels, got {s.shape}")
    if t is None:
        t = process.t_of_sigma(s)
        if round_t:
            t = jnp.round(t)
    else:
        t = jnp.asarray(np.asarray(t, np.float64), jnp.float32)
        if t.shape != (s.shape[0] - 1,):
            raise ValueError(f"t must give the {s.shape[0] - 1} levels before the last, got "
                             f"shape {t.shape}")  # fmt: skip
        t = jnp.concatenate([t, process.t_of_sigma(s[-1:])])
    t = jnp.where(s == 0, -1.0, t)
    alpha = jax.lax.rsqrt(1.0 + s**2)
    return _finish_grid(Grid(t, alpha, s * alpha, s.shape[0] - 1), max_steps, "sigma_grid")


def _finish_grid(grid: Grid, max_steps: int | None, what: str) -> Grid:
    check_grid(grid, what)
    if max_steps is None:
        return grid
    if max_steps < grid.num_steps:
        raise ValueError(f"{what}: max_steps {max_steps} is below the {grid.num_steps} steps")
    length = max_steps + 1
    return Grid(
        *(_pad_to(a, length) for a in (grid.t, grid.alpha, grid.sigma)),
        jnp.asarray(grid.num_steps, jnp.int32),
    )


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------


class SampleOutput(NamedTuple):
    """A sampler's result. ``trajectory`` / ``pred_x0`` are [L, *x.shape] (entry i after step
    i; skipped steps repeat the last state) when asked for, else None."""

    sample: jnp.ndarray
    trajectory: jnp.ndarray | None
    pred_x0: jnp.ndarray | None


class Sampler(NamedTuple):
    """A sampler as a public init/step pair.

    ``init(x_T, grid) -> state`` (a NamedTuple whose first field is ``x``) and ``step(denoise,
    state, grid, i, z) -> (state, x0)``, where ``denoise(x, t, alpha, sigma) -> Denoised``
    (the driver binds self-conditioning) or ``denoise.at_sigma(x, sigma_ve)``, ``i`` the step
    index (a traced int32) and ``z`` the step's standard normal draw (zeros for a
    deterministic sampler). ``calls`` is the number of network evaluations per step.
    """

    name: str
    init: Callable
    step: Callable
    stochastic: bool = False
    calls: int = 1
    min_steps: int = 1
    reverse: bool = False  # runs towards more noise (DDIM inversion)
    check: Callable | None = None  # check(grid, last_sigma) before the scan (a concrete grid)


class _Bound:
    """The denoiser with the previous x0 bound (for self-conditioning)."""

    def __init__(self, denoiser, x0_prev):
        self.denoiser, self.x0_prev = denoiser, x0_prev

    def __call__(self, x, t, alpha, sigma):
        return self.denoiser(x, t, alpha, sigma, self.x0_prev)

    def at_sigma(self, x, sigma_ve):
        return self.denoiser.at_sigma(x, sigma_ve, self.x0_prev)

    def raw(self, x, t):
        return self.denoiser.raw(x, t, self.x0_prev)

    @property
    def process(self):
        return self.denoiser.process


def noise_source(key, noise, length: int, x: jnp.ndarray, what: str, required: bool = True):
    """``i -> z_i``: ``normal(fold_in(key, i))``, or ``noise[i]`` for explicit [L, *x.shape];
    zeros when neither is given and the sampler is deterministic (``required=False``)."""
    if key is not None and noise is not None:
        raise ValueError(f"{what} needs exactly one of key= or noise=, got both")
    if key is None and noise is None:
        if required:
            raise ValueError(
                f"{what} needs exactly one of key= or noise= (it draws noise at every step)"
            )
        return lambda i: jnp.zeros_like(x)
    if noise is not None:
        if noise.shape[1:] != x.shape or noise.shape[0] < length:
            raise ValueError(
                f"{what}: noise must have shape [{length}, *x.shape] = {(length, *x.shape)}, "
                f"got {noise.shape}"
            )
        return lambda i: noise[i]
    return lambda i: jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)


def sample(
    sampler: Sampler,
    denoiser: Denoiser,
    x_T: jnp.ndarray,
    grid: Grid,
    *,
    key: jax.Array | None = None,
    noise: jnp.ndarray | None = None,
    callback: Callable[[dict], None] | None = None,
    return_trajectory: bool = False,
) -> SampleOutput:
    """Run ``sampler`` over ``grid`` from ``x_T`` (the variance-preserving x at point 0, e.g.
    standard normal noise) with one ``lax.scan``.

    Randomness: ``key`` (step i draws ``normal(fold_in(key, i))``) or ``noise`` [L, *x.shape]
    (step i uses ``noise[i]``); a stochastic sampler needs one of them. ``callback(info)``
    runs on the host after every step with ``{"i", "x", "sigma", "denoised"}`` (a progress
    bar, k-diffusion's callback). A Python-int ``grid.num_steps`` gives a scan of exactly that
    length; a traced one runs the padded length and skips the steps past it.
    """
    if not isinstance(sampler, Sampler):
        raise TypeError(f"sampler must be a samplers.Sampler, got {type(sampler).__name__}")
    check_grid(grid, sampler.name, sampler.reverse)
    if denoiser.prediction == "prev_x" and sampler.name not in ("ddpm", "ddim", "ddim_reverse"):
        raise ValueError(
            f"{sampler.name} needs eps, x0 or v at any noise level; a previous-x network "
            "(mean_type 'prev_x') predicts x_{t-1} from its table's own steps: sample it with "
            "ddpm or ddim"
        )
    n_static = _static(grid.num_steps)
    if n_static is not None and n_static < sampler.min_steps:
        raise ValueError(
            f"{sampler.name} needs at least {sampler.min_steps} steps (one per order), got "
            f"{n_static}: use a lower order or more steps"
        )
    if sampler.check is not None and n_static is not None:
        try:
            last_sigma = float(grid.sigma[n_static])
        except (TypeError, jax.errors.ConcretizationTypeError):
            last_sigma = None
        sampler.check(grid, last_sigma)
    length = grid.length if n_static is None else n_static
    draw = noise_source(key, noise, length, x_T, sampler.name, required=sampler.stochastic)
    state = sampler.init(x_T, grid)

    def run(carry, i):
        state, x0_prev = carry
        state, x0 = sampler.step(_Bound(denoiser, x0_prev), state, grid, i, draw(i))
        if callback is not None:
            info = {"i": i, "x": state[0], "sigma": grid.sigma[i + 1], "denoised": x0}
            jax.debug.callback(callback, info)
        return state, x0

    def body(carry, i):
        if n_static is None:
            carry = jax.lax.cond(i < grid.num_steps, run, lambda c, _: c, carry, i)
        else:
            carry = run(carry, i)
        out = (carry[0][0], carry[1]) if return_trajectory else None
        return carry, out

    init = (state, jnp.zeros_like(x_T))
    (state, _), ys = jax.lax.scan(body, init, jnp.arange(length, dtype=jnp.int32))
    if return_trajectory:
        return SampleOutput(state[0], ys[0], ys[1])
    return SampleOutput(state[0], None, None)


# --------------------------------------------------------------------------------------------
# Grids by name
# --------------------------------------------------------------------------------------------

GRIDS = ("linspace", "leading", "trailing", "karras", "exponential")  # = config.SAMPLER_GRIDS


def make_grid(
    process,
    num_steps: int,
    kind: str = "linspace",
    *,
    final: str = "zero",
    steps_offset: int = 0,
    skip_last: bool = True,
    round_t: bool = True,
    rho: float = 7.0,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    max_steps: int | None = None,
) -> Grid:
    """A grid of ``num_steps`` steps by name.

    * ``linspace`` / ``leading`` / ``trailing``: timesteps of the table spaced as
      :func:`jaxdiff.schedules.spaced_timesteps` (``skip_last``: n + 1 points less the
      smallest, diffusers' DPM-Solver and UniPC; ``round_t=False``: fractional timesteps,
      diffusers' Euler), ending at ``final`` (``"zero"``: the clean image, ``"sigma_min"``: the
      table's first timestep); on a continuous process ``linspace`` is t = 1 - k / n, ending at
      the clean image.
    * ``karras``: Karras et al.'s sigmas (``rho``) over [sigma_min, sigma_max] (default the
      process's range), then 0; timesteps from ``sigma_to_t`` (rounded with ``round_t``, as
      diffusers' DPM-Solver / UniPC; k-diffusion and diffusers' Euler keep them fractional).
    * ``exponential``: sigmas uniform in log-SNR (k-diffusion ``get_sigmas_exponential``).
    """
    from jaxdiff import schedules

    process = as_process(process)
    if kind not in GRIDS:
        raise ValueError(f"unknown grid {kind!r}; choose one of {list(GRIDS)}")
    n = _static(num_steps)
    if n is None:
        raise ValueError(
            "make_grid needs a Python int step count; for a traced count build grids for each "
            "count with the same max_steps and pass them into the compiled sampler"
        )
    if n < 1:
        raise ValueError(f"the number of steps must be >= 1, got {num_steps}")
    if kind in ("karras", "exponential"):
        lo, hi = process.sigma_range()
        lo = lo if sigma_min is None else sigma_min
        hi = hi if sigma_max is None else sigma_max
        if final != "zero":
            raise ValueError(f"a {kind} grid ends at sigma 0 (final='zero'), got final={final!r}")
        if kind == "karras":
            sigmas = schedules.karras_sigmas(n, lo, hi, rho)
        else:
            sigmas = schedules.exponential_sigmas(n, lo, hi)
        return sigma_grid(process, sigmas, round_t=round_t, max_steps=max_steps)
    if isinstance(process, Continuous):
        if kind != "linspace":
            raise ValueError(f"a continuous process has no {kind!r} timestep spacing")
        t = jnp.asarray(np.linspace(1.0, 0.0, n + 1), jnp.float32)
        alpha, sigma = process.alpha_sigma(t)
        alpha, sigma = alpha.at[-1].set(1.0), sigma.at[-1].set(0.0)
        return _finish_grid(Grid(t.at[-1].set(-1.0), alpha, sigma, n), max_steps, "make_grid")
    ts = schedules.spaced_timesteps(
        process.c.num_timesteps, n, kind, steps_offset=steps_offset, skip_last=skip_last,
        rounded=round_t,
    )  # fmt: skip
    return timestep_grid(process, ts, final=final, max_steps=max_steps)
