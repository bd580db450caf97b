"""DDPM ancestral sampling, DDIM and its inversion, on the sampler API of :mod:`.core`, and
the convenience functions ``ddpm_sample`` / ``ddim_sample`` / ``ddim_reverse_sample`` /
``interpolate`` that build the denoiser and the grid from a coefficient table.

:class:`TimeGrid` is a grid of table indices (t -> t_next, t_next = -1 the clean image) with a
possibly traced step count: denoising-diffusion-pytorch's DDIM time pairs (:func:`ddim_grid`)
and the table's own chain (:func:`ddpm_grid`). A static step count gives a grid of exactly that
many steps; a traced one pads to ``max_steps``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxdiff import gaussian
from jaxdiff.gaussian import DiffusionCoeffs
from jaxdiff.samplers import core
from jaxdiff.samplers.core import Grid, SampleOutput, Sampler, _static

__all__ = [
    "TimeGrid",
    "ddim",
    "ddim_grid",
    "ddim_reverse",
    "ddim_reverse_sample",
    "ddim_sample",
    "ddpm",
    "ddpm_grid",
    "ddpm_sample",
    "index_grid",
    "interpolate",
    "torch_linspace",
]


class TimeGrid(NamedTuple):
    """A padded sequence of table steps (t -> t_next); t_next = -1 means "to the clean image"."""

    t: jnp.ndarray  # shape=(L,), int32
    t_next: jnp.ndarray  # shape=(L,), int32
    num_steps: jnp.ndarray  # int, or a traced int32: steps [0, num_steps) run


def _check_steps(num_steps, max_steps: int, what: str) -> None:
    n = _static(num_steps)
    if n is not None and not 1 <= n <= max_steps:
        raise ValueError(f"{what}: the number of steps must be in [1, {max_steps}], got {n}")


def _max_steps(num_steps, max_steps, num_timesteps: int) -> int:
    """The padded length: ``max_steps`` if given, else the static count, else T (the most a
    traced count can be)."""
    if max_steps is not None:
        return max_steps
    n = _static(num_steps)
    return num_timesteps if n is None else n


def torch_linspace(start: float, end: float, count: jnp.ndarray, length: int) -> jnp.ndarray:
    """``torch.linspace(start, end, count)`` in float32, padded to ``length``; count may be traced.

    torch computes the first half as start + step * i and the second half as
    end - step * (count - 1 - i), with step = (end - start) / (count - 1) in float32; reproducing
    it matters where its rounding truncates to another integer (denoising-diffusion-pytorch's DDIM
    time pairs).
    """
    count = jnp.asarray(count, jnp.int32)
    i = jnp.arange(length, dtype=jnp.int32)
    start32, end32 = jnp.float32(start), jnp.float32(end)
    denom = jnp.maximum(count - 1, 1).astype(jnp.float32)
    step = (end32 - start32) / denom
    head = start32 + step * i.astype(jnp.float32)
    tail = end32 - step * (count - 1 - i).astype(jnp.float32)
    return jnp.where(i < count // 2, head, tail)


def ddpm_grid(num_timesteps: int, num_steps=None, max_steps: int | None = None) -> TimeGrid:
    """Every step t -> t - 1 for t = num_steps - 1, ..., 0 (all T steps by default).

    Fewer steps start part-way, at t = num_steps - 1 (as ``interpolate`` does); for a faster
    chain, respace the coefficient table instead (``make_coeffs(respacing=...)``). A static
    ``num_steps`` gives exactly that many steps; a traced one pads to ``max_steps`` (default T).
    """
    num_steps = num_timesteps if num_steps is None else num_steps
    _check_steps(num_steps, min(max_steps or num_timesteps, num_timesteps), "ddpm_grid")
    max_steps = _max_steps(num_steps, max_steps, num_timesteps)
    n = _static(num_steps)
    n = jnp.asarray(num_steps, jnp.int32) if n is None else n
    k = jnp.arange(max_steps, dtype=jnp.int32)
    t = jnp.maximum(n - 1 - k, 0)
    return TimeGrid(t, t - 1, n)


def ddim_grid(num_timesteps: int, num_steps, max_steps: int | None = None) -> TimeGrid:
    """denoising-diffusion-pytorch's DDIM time pairs, for a possibly traced step count S.

    times = int(linspace(-1, T - 1, S + 1)) in float32, truncated toward zero and reversed; the
    pairs are consecutive times, so t = 0 is never fed to the model when T / S > 1 and the last
    pair ends at -1 (the clean image). The float32 linspace makes some S differ from exact
    arithmetic (e.g. S = 26 at T = 1000); this is the reference's grid, kept for parity.

    Args:
      num_timesteps: T of the process.
      num_steps: S in [1, T], a Python int (the grid has exactly S steps) or a traced int32.
      max_steps: static padded length for a traced S (default T); S must not exceed it.
    """
    _check_steps(num_steps, min(max_steps or num_timesteps, num_timesteps), "ddim_grid")
    max_steps = _max_steps(num_steps, max_steps, num_timesteps)
    n = _static(num_steps)
    s = jnp.asarray(num_steps, jnp.int32)
    times = torch_linspace(-1.0, num_timesteps - 1.0, s + 1, max_steps + 1).astype(jnp.int32)
    k = jnp.arange(max_steps, dtype=jnp.int32)
    t = times[jnp.clip(s - k, 0, max_steps)]
    t_next = times[jnp.clip(s - k - 1, 0, max_steps)]
    return TimeGrid(jnp.maximum(t, 0), t_next, s if n is None else n)


def index_grid(process, grid: TimeGrid) -> Grid:
    """The :class:`core.Grid` of a table-index grid (its points t_0, ..., t_{L-1}, then the
    last t_next)."""
    process = core.as_process(process)
    t = jnp.concatenate([grid.t, grid.t_next[-1:]]).astype(jnp.float32)
    n = grid.num_steps
    # padded steps repeat the last point, so the point after the last step is its t_next
    t = t.at[n].set(grid.t_next[n - 1].astype(jnp.float32))
    alpha, sigma = process.alpha_sigma(t)
    return Grid(t, alpha, sigma, n)


# --------------------------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------------------------


class State(NamedTuple):
    x: jnp.ndarray


def _init(x, grid):
    return State(x)


def ddpm(var_type: str = "fixed_small") -> Sampler:
    """Ancestral sampling x_{t-1} = mu_theta(x_t, t) + sigma_t z (Ho et al. 2020, Alg. 2).

    On a discrete process the grid must be the table's own chain (t -> t - 1; respace the table
    for fewer steps) and mean and variance come from :func:`jaxdiff.gaussian.p_mean_variance`
    (every mean type, ``prev_x`` included, and every variance type: ``fixed_small``,
    ``fixed_large``, ``learned``, ``learned_range``); on a continuous process from
    :func:`jaxdiff.continuous.continuous_p_mean_variance` between consecutive grid times. No
    noise is added on the step to the clean image. A ``cond_fn`` on the denoiser shifts the
    mean by variance * gradient (Dhariwal & Nichol 2021, Alg. 1).

    References: improved-diffusion ``p_sample_loop``; guided-diffusion ``condition_mean``;
    denoising-diffusion-pytorch ``p_sample_loop`` and ``ContinuousTimeGaussianDiffusion``.
    """
    var_type = gaussian.canonical_var_type(var_type)

    def step(denoise, state, grid, i, z):
        x = state.x
        process = denoise.process
        out, time = denoise.raw(x, grid.t[i])
        d = denoise.denoiser
        if isinstance(process, core.Discrete):
            t = jnp.full(x.shape[:1], grid.t[i], jnp.float32).astype(jnp.int32)
            pmv = gaussian.p_mean_variance(
                process.c, out, x, t, mean_type=d.prediction, var_type=var_type,
                clip_denoised=d.clip_denoised, denoised_fn=d.denoised_fn,
            )  # fmt: skip
            mean, log_var, x0 = pmv.mean, pmv.log_variance, pmv.pred_x0
            variance = pmv.variance
        else:
            from jaxdiff import continuous

            lam, lam_next = process.model_time(grid.t[i]), process.model_time(grid.t[i + 1])
            mean, variance = continuous.continuous_p_mean_variance(
                out, x, lam, lam_next, objective=d.prediction, clip_denoised=d.clip_denoised
            )
            log_var = jnp.log(jnp.maximum(variance, 1e-30))
            alpha, sigma = grid.alpha[i], grid.sigma[i]
            x0 = alpha * x - sigma * out if d.prediction == "v" else (x - sigma * out) / alpha
        if d.cond_fn is not None:
            mean = mean + variance * d.cond_fn(x, time, **(d.model_kwargs or {}))
        nonzero = (grid.sigma[i + 1] > 0).astype(x.dtype)
        return State(mean + nonzero * jnp.exp(0.5 * log_var) * z), x0

    return Sampler("ddpm", _init, step, stochastic=True)


def ddim(eta: float = 0.0) -> Sampler:
    """DDIM (Song et al. 2021, Eq. 12) between consecutive grid points.

    .. math:: x' = \\alpha' \\hat x_0 + \\sqrt{1 - \\alpha'^2 - s^2}\\,\\hat\\epsilon + s z,
        \\quad s = \\eta \\frac{\\sigma'}{\\sigma}\\sqrt{1 - \\alpha^2/\\alpha'^2}

    (alpha^2 is abar); the step to the clean image returns x0. eta = 0 is deterministic; eta =
    1 on the table's chain is DDPM with the small variance.
    """
    eta_value = _static(eta, float)
    if eta_value is not None and eta_value < 0:
        raise ValueError(f"eta must be >= 0 (0 is deterministic DDIM, 1 is DDPM-like), got {eta}")

    def step(denoise, state, grid, i, z):
        x = state.x
        d = denoise(x, grid.t[i], grid.alpha[i], grid.sigma[i])
        abar, abar_next = grid.alpha[i] ** 2, grid.alpha[i + 1] ** 2
        s = eta * jnp.sqrt((1 - abar_next) / (1 - abar) * (1 - abar / abar_next))
        coef = jnp.sqrt(jnp.maximum(1 - abar_next - s**2, 0.0))
        return State(grid.alpha[i + 1] * d.x0 + coef * d.eps + s * z), d.x0

    stochastic = eta_value is None or eta_value > 0
    return Sampler("ddim", _init, step, stochastic=stochastic)


def ddim_reverse() -> Sampler:
    """Deterministic DDIM inversion along an increasing grid: x' = alpha' x0 + sigma' eps
    (improved-diffusion ``ddim_reverse_sample``)."""

    def step(denoise, state, grid, i, z):
        d = denoise(state.x, grid.t[i], grid.alpha[i], grid.sigma[i])
        return State(grid.alpha[i + 1] * d.x0 + grid.sigma[i + 1] * d.eps), d.x0

    return Sampler("ddim_reverse", _init, step, reverse=True)


# --------------------------------------------------------------------------------------------
# Convenience functions over a coefficient table
# --------------------------------------------------------------------------------------------


def _legacy_denoiser(model_fn, c, mean_type, var_type, clip_denoised, denoised_fn, cond_fn,
                     self_condition, model_kwargs):  # fmt: skip
    var_type = gaussian.canonical_var_type(var_type)
    return core.make_denoiser(
        model_fn,
        c,
        prediction=gaussian.canonical_mean_type(mean_type),
        learned_variance=var_type in ("learned", "learned_range"),
        clip_denoised=clip_denoised,
        denoised_fn=denoised_fn,
        cond_fn=cond_fn,
        self_condition=self_condition,
        model_kwargs=model_kwargs,
        rederive_eps=True,  # improved-diffusion and denoising-diffusion-pytorch re-derive eps
    )


def ddpm_sample(
    model_fn: Callable[..., jnp.ndarray],
    c: DiffusionCoeffs,
    x_T: jnp.ndarray,
    *,
    key: jax.Array | None = None,
    noise: jnp.ndarray | None = None,
    grid: TimeGrid | None = None,
    mean_type: str = "eps",
    var_type: str = "fixed_small",
    clip_denoised: bool = True,
    denoised_fn: Callable[[jnp.ndarray], jnp.ndarray] | None = None,
    cond_fn: Callable[..., jnp.ndarray] | None = None,
    self_condition: bool = False,
    return_trajectory: bool = False,
    model_kwargs: dict | None = None,
) -> SampleOutput:
    """:func:`ddpm` over the table's chain (default :func:`ddpm_grid` of every step).

    ``cond_fn(x, time, **model_kwargs)`` returning grad_x log p(y | x) is classifier guidance of
    the mean; with ``self_condition`` the network also gets ``x_self_cond``, the previous
    step's x0 (zeros at the first step). ``noise`` is [L, *x_T.shape].
    """
    grid = ddpm_grid(c.num_timesteps) if grid is None else grid
    d = _legacy_denoiser(model_fn, c, mean_type, var_type, clip_denoised, denoised_fn, cond_fn,
                         self_condition, model_kwargs)  # fmt: skip
    return core.sample(
        ddpm(var_type), d, x_T, index_grid(c, grid), key=key, noise=noise,
        return_trajectory=return_trajectory,
    )  # fmt: skip


def ddim_sample(
    model_fn: Callable[..., jnp.ndarray],
    c: DiffusionCoeffs,
    x_T: jnp.ndarray,
    *,
    grid: TimeGrid | None = None,
    eta: float = 0.0,
    key: jax.Array | None = None,
    noise: jnp.ndarray | None = None,
    mean_type: str = "eps",
    var_type: str = "fixed_small",
    clip_denoised: bool = True,
    denoised_fn: Callable[[jnp.ndarray], jnp.ndarray] | None = None,
    cond_fn: Callable[..., jnp.ndarray] | None = None,
    self_condition: bool = False,
    return_trajectory: bool = False,
    model_kwargs: dict | None = None,
) -> SampleOutput:
    """:func:`ddim` over a table-index grid, eps re-derived from the processed x0 (as both
    references). A learned variance output is accepted and ignored (sigma comes from eta);
    ``cond_fn`` gives score guidance (guided-diffusion ``condition_score``).

    Grids: :func:`ddim_grid` gives denoising-diffusion-pytorch's time pairs on the full table;
    :func:`ddpm_grid` on a table respaced with ``"ddimN"`` or section counts gives
    improved-diffusion's ``ddim_sample_loop``.
    """
    sampler = ddim(eta)
    grid = ddpm_grid(c.num_timesteps) if grid is None else grid
    d = _legacy_denoiser(model_fn, c, mean_type, var_type, clip_denoised, denoised_fn, cond_fn,
                         self_condition, model_kwargs)  # fmt: skip
    return core.sample(
        sampler, d, x_T, index_grid(c, grid), key=key, noise=noise,
        return_trajectory=return_trajectory,
    )  # fmt: skip


def ddim_reverse_sample(
    model_fn: Callable[..., jnp.ndarray],
    c: DiffusionCoeffs,
    x0: jnp.ndarray,
    *,
    grid: TimeGrid | None = None,
    mean_type: str = "eps",
    var_type: str = "fixed_small",
    clip_denoised: bool = True,
    denoised_fn: Callable[[jnp.ndarray], jnp.ndarray] | None = None,
    return_trajectory: bool = False,
    model_kwargs: dict | None = None,
) -> SampleOutput:
    """Deterministic DDIM inversion: an image to the latent that DDIM (eta = 0) maps back to it.

    Runs the grid's pairs backwards: the image stands at the grid's smallest time, and each
    step evaluates the network at (x, t) and moves up to the next time t' of the grid with
    :math:`x' = \\sqrt{\\bar\\alpha_{t'}}\\hat x_0 + \\sqrt{1-\\bar\\alpha_{t'}}\\hat\\epsilon`
    (improved-diffusion ``ddim_reverse_sample``, as a loop). The result starts
    :func:`ddim_sample` with the same grid.
    """
    grid = ddpm_grid(c.num_timesteps) if grid is None else grid
    length = grid.t.shape[0]
    # The forward pairs visit t_0 > t_1 > ... > t_{n-1} (then the clean image). Backwards, the
    # image stands at t_{n-1}, and step k moves from t_{n-1-k} to t_{n-2-k}: n - 1 steps.
    n = grid.num_steps
    idx = jnp.asarray(n, jnp.int32) - 1 - jnp.arange(length, dtype=jnp.int32)
    t = grid.t[jnp.clip(idx, 0, length - 1)].astype(jnp.float32)
    alpha, sigma = core.as_process(c).alpha_sigma(t)
    n_static = _static(n)
    steps = n - 1 if n_static is None else n_static - 1
    if n_static is not None and steps < 1:
        return SampleOutput(x0, x0[None] if return_trajectory else None, None)
    rgrid = Grid(t, alpha, sigma, steps)
    if n_static is not None:
        rgrid = Grid(t[: steps + 1], alpha[: steps + 1], sigma[: steps + 1], steps)
    d = _legacy_denoiser(model_fn, c, mean_type, var_type, clip_denoised, denoised_fn, None,
                         False, model_kwargs)  # fmt: skip
    return core.sample(ddim_reverse(), d, x0, rgrid, return_trajectory=return_trajectory)


def interpolate(
    model_fn: Callable[..., jnp.ndarray],
    c: DiffusionCoeffs,
    x1: jnp.ndarray,
    x2: jnp.ndarray,
    *,
    t=None,
    lam: float = 0.5,
    key: jax.Array | None = None,
    q_noise: jnp.ndarray | None = None,
    noise: jnp.ndarray | None = None,
    **sample_kwargs,
) -> jnp.ndarray:
    """Interpolate two images in the noised space (denoising-diffusion-pytorch ``interpolate``).

    Both are noised to step t, mixed as (1 - lam) x1_t + lam x2_t, and denoised by
    :func:`ddpm_sample` from step t - 1 down to 0 (t = T - 1 by default; as the reference, the
    first denoising step is t - 1). Randomness: ``key``, or ``q_noise`` [2, *x1.shape] for the
    two forward draws plus ``noise`` for the reverse steps.
    """
    if x1.shape != x2.shape:
        raise ValueError(f"x1 and x2 must have the same shape, got {x1.shape} and {x2.shape}")
    t = c.num_timesteps - 1 if t is None else t
    _check_steps(t, c.num_timesteps - 1, "interpolate t")
    if key is not None:
        k1, k2, key = jax.random.split(key, 3)
        q_noise = jnp.stack(
            [jax.random.normal(k1, x1.shape, x1.dtype), jax.random.normal(k2, x1.shape, x1.dtype)]
        )
    elif q_noise is None or q_noise.shape != (2, *x1.shape):
        raise ValueError("interpolate needs key=, or q_noise of shape [2, *x1.shape] and noise=")
    tb = jnp.full(x1.shape[:1], t, jnp.int32)
    x1_t = gaussian.q_sample(c, x1, tb, q_noise[0])
    x2_t = gaussian.q_sample(c, x2, tb, q_noise[1])
    img = (1 - lam) * x1_t + lam * x2_t
    static_t = _static(t)
    grid = ddpm_grid(c.num_timesteps, t, max_steps=static_t)
    return ddpm_sample(model_fn, c, img, key=key, noise=noise, grid=grid, **sample_kwargs).sample
