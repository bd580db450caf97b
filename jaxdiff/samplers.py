"""Samplers as single compiled programs: DDPM ancestral, DDIM (forward and reverse), guidance.

Every sampler is a step function driven by one ``lax.scan`` over a :class:`TimeGrid`, a padded
array of (t, t_next) pairs with a possibly traced step count: steps past ``num_steps`` are
skipped with ``lax.cond``, so one compiled function serves 10, 50 and 1000 steps.

Randomness is explicit: pass ``key`` (step i draws ``normal(fold_in(key, i))``) or ``noise``
[L, *x.shape] (step i uses ``noise[i]``), which is how the parity tests feed the references'
draws. A network is ``model_fn(x_t, time, **model_kwargs)`` with ``time = c.model_times[t]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxdiff import gaussian, guidance
from jaxdiff.gaussian import DiffusionCoeffs

__all__ = [
    "SampleOutput",
    "TimeGrid",
    "ddim_grid",
    "ddim_reverse_sample",
    "ddim_sample",
    "ddpm_grid",
    "ddpm_sample",
    "guided_model_fn",
    "interpolate",
    "noise_source",
    "run_steps",
    "torch_linspace",
]


class TimeGrid(NamedTuple):
    """A padded sequence of steps (t -> t_next); t_next = -1 means "to the clean image"."""

    t: jnp.ndarray  # shape=(L,), int32
    t_next: jnp.ndarray  # shape=(L,), int32
    num_steps: jnp.ndarray  # shape=(), int32: steps [0, num_steps) run, the rest are skipped


class SampleOutput(NamedTuple):
    """A sampler's result. ``trajectory`` / ``pred_x0`` are [L, *x.shape] (entry i after step
    i; skipped steps repeat the last state) when asked for, else None."""

    sample: jnp.ndarray
    trajectory: jnp.ndarray | None
    pred_x0: jnp.ndarray | None


def _static(value, kind=int):
    """``kind(value)`` for a Python or concrete value; None for a traced one."""
    try:
        return kind(value)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return None


def _check_steps(num_steps, max_steps: int, what: str) -> None:
    n = _static(num_steps)
    if n is not None and not 1 <= n <= max_steps:
        raise ValueError(f"{what}: the number of steps must be in [1, {max_steps}], got {n}")


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
    chain, respace the coefficient table instead (``make_coeffs(respacing=...)``). The grid is
    padded to ``max_steps`` (default T) so that a traced ``num_steps`` is possible.
    """
    num_steps = num_timesteps if num_steps is None else num_steps
    max_steps = num_timesteps if max_steps is None else max_steps
    _check_steps(num_steps, min(max_steps, num_timesteps), "ddpm_grid")
    n = jnp.asarray(num_steps, jnp.int32)
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
      num_steps: S in [1, T], a Python int or a traced int32 scalar.
      max_steps: static padded length (default T); S must not exceed it.
    """
    max_steps = num_timesteps if max_steps is None else max_steps
    _check_steps(num_steps, min(max_steps, num_timesteps), "ddim_grid")
    s = jnp.asarray(num_steps, jnp.int32)
    times = torch_linspace(-1.0, num_timesteps - 1.0, s + 1, max_steps + 1).astype(jnp.int32)
    k = jnp.arange(max_steps, dtype=jnp.int32)
    t = times[jnp.clip(s - k, 0, max_steps)]
    t_next = times[jnp.clip(s - k - 1, 0, max_steps)]
    return TimeGrid(jnp.maximum(t, 0), t_next, s)


def guided_model_fn(
    model_fn: Callable[..., jnp.ndarray],
    scale: float,
    cond_kwargs: dict,
    uncond_kwargs: dict,
    channels: int | None = None,
    *,
    rescaled_phi: float = 0.0,
    remove_parallel_component: bool = False,
    batched: bool = False,
) -> Callable[..., jnp.ndarray]:
    """Classifier-free guidance (Ho & Salimans 2022): out = u + scale * (c - u).

    ``c`` and ``u`` are the outputs with ``cond_kwargs`` and ``uncond_kwargs`` (for jaxdiff's
    class-conditional Unet ``{"label": y}`` and ``{"label": -1 everywhere}``, the null class),
    mixed by :func:`jaxdiff.guidance.guided_output`: ``rescaled_phi`` blends in the output
    rescaled to the conditional one's standard deviation, ``remove_parallel_component`` drops
    the part of ``c - u`` parallel to ``c`` (denoising-diffusion-pytorch's
    ``forward_with_cond_scale`` does both, the removal by default). With a learned variance
    pass ``channels`` = C: only the first C (mean) channels are guided, the variance channels
    come from the conditional output. ``batched`` evaluates both in one network call on the
    doubled batch (x, the time and every keyword argument concatenated along axis 0; cond and
    uncond kwargs need the same keys).
    """

    def mix(cond, uncond):
        c, u = (
            (cond, uncond) if channels is None else (cond[..., :channels], uncond[..., :channels])
        )
        guided = guidance.guided_output(
            c, u, scale, rescaled_phi, remove_parallel_component=remove_parallel_component
        )
        if channels is None:
            return guided
        return jnp.concatenate([guided, cond[..., channels:]], axis=-1)

    if batched and set(cond_kwargs) != set(uncond_kwargs):
        raise ValueError(
            f"batched guidance needs the same keyword arguments for both halves, got "
            f"{sorted(cond_kwargs)} and {sorted(uncond_kwargs)}"
        )

    def guided(x, time, **kwargs):
        if not batched:
            cond = model_fn(x, time, **kwargs, **cond_kwargs)
            uncond = model_fn(x, time, **kwargs, **uncond_kwargs)
            return mix(cond, uncond)
        n = x.shape[0]
        both = {k: jnp.concatenate([v, v]) for k, v in kwargs.items()}
        both.update({k: jnp.concatenate([cond_kwargs[k], uncond_kwargs[k]]) for k in cond_kwargs})
        time = jnp.broadcast_to(time, (n,))
        out = model_fn(jnp.concatenate([x, x]), jnp.concatenate([time, time]), **both)
        return mix(out[:n], out[n:])

    return guided


def noise_source(key, noise, length: int, x: jnp.ndarray, what: str):
    """``i -> z_i``: ``normal(fold_in(key, i))``, or ``noise[i]`` for explicit [L, *x.shape]."""
    if (key is None) == (noise is None):
        raise ValueError(f"{what} needs exactly one of key= or noise=")
    if noise is not None:
        if noise.shape[1:] != x.shape or noise.shape[0] < length:
            raise ValueError(
                f"{what}: noise must have shape [{length}, *x.shape] = {(length, *x.shape)}, "
                f"got {noise.shape}"
            )
        return lambda i: noise[i]
    return lambda i: jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)


def run_steps(step, x, grid: TimeGrid, draw, return_trajectory: bool) -> SampleOutput:
    """Run ``step(x, x0_prev, t, t_next, z) -> (x, x0)`` over the grid, skipping padding."""
    length = grid.t.shape[0]

    def body(carry, i):
        x, x0_prev = carry

        def run(c):
            return step(c[0], c[1], grid.t[i], grid.t_next[i], draw(i))

        carry = jax.lax.cond(i < grid.num_steps, run, lambda c: c, (x, x0_prev))
        return carry, (carry if return_trajectory else None)

    init = (x, jnp.zeros_like(x))
    (x, _), ys = jax.lax.scan(body, init, jnp.arange(length, dtype=jnp.int32))
    if return_trajectory:
        return SampleOutput(x, ys[0], ys[1])
    return SampleOutput(x, None, None)


def _model_output(model_fn, c, x, t, x0_prev, self_condition, model_kwargs):
    time = jnp.broadcast_to(c.model_times[t], x.shape[:1])
    kwargs = dict(model_kwargs or {})
    if self_condition:
        kwargs["x_self_cond"] = x0_prev
    return model_fn(x, time, **kwargs), time


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
    """Ancestral sampling x_{t-1} = mu_theta(x_t, t) + sigma_t z (Ho et al. 2020, Alg. 2).

    Mean and variance come from :func:`jaxdiff.gaussian.p_mean_variance` (every mean and
    variance type); no noise is added at t = 0. ``cond_fn(x, time, **model_kwargs)`` returning
    grad_x log p(y | x) shifts the mean by variance * gradient (classifier guidance of the mean,
    Dhariwal & Nichol 2021, Alg. 1). With ``self_condition`` the network also gets
    ``x_self_cond``, the previous step's x0 (zeros at the first step).

    Args:
      model_fn, c: the network and the coefficient table (respace the table for fewer steps).
      x_T: [B, ..., C] starting noise.
      key / noise: per-step randomness, exactly one; ``noise`` is [L, *x_T.shape].
      grid: steps to run (default :func:`ddpm_grid` over the whole table).

    Returns:
      :class:`SampleOutput`.

    References: improved-diffusion ``p_sample_loop``; guided-diffusion ``condition_mean``;
    denoising-diffusion-pytorch ``p_sample_loop``.
    """
    grid = ddpm_grid(c.num_timesteps) if grid is None else grid
    draw = noise_source(key, noise, grid.t.shape[0], x_T, "ddpm_sample")

    def step(x, x0_prev, t_scalar, _t_next, z):
        t = jnp.full(x.shape[:1], t_scalar, jnp.int32)
        out, time = _model_output(model_fn, c, x, t, x0_prev, self_condition, model_kwargs)
        pmv = gaussian.p_mean_variance(
            c,
            out,
            x,
            t,
            mean_type=mean_type,
            var_type=var_type,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
        )
        mean = pmv.mean
        if cond_fn is not None:
            mean = mean + pmv.variance * cond_fn(x, time, **(model_kwargs or {}))
        nonzero = (t_scalar != 0).astype(x.dtype)
        return mean + nonzero * jnp.exp(0.5 * pmv.log_variance) * z, pmv.pred_x0

    return run_steps(step, x_T, grid, draw, return_trajectory)


def _eps_x0_predictor(
    model_fn,
    c,
    *,
    mean_type,
    var_type,
    clip_denoised,
    denoised_fn,
    cond_fn,
    self_condition,
    model_kwargs,
):
    """``(x, t_scalar, x0_prev) -> (eps, x0)``: the network's prediction, x0 processed and eps
    re-derived from it, then moved by score guidance if ``cond_fn`` is given."""

    def predict(x, t_scalar, x0_prev):
        t = jnp.full(x.shape[:1], t_scalar, jnp.int32)
        out, time = _model_output(model_fn, c, x, t, x0_prev, self_condition, model_kwargs)
        mean_out, _ = gaussian.split_model_output(out, x, var_type)
        eps, x0 = gaussian.model_predictions(
            c,
            mean_out,
            x,
            t,
            mean_type=mean_type,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            rederive_eps=True,
        )
        if cond_fn is not None:
            # Score guidance (Song et al. 2021; guided-diffusion condition_score): eps moves
            # against the classifier gradient and x0 follows it, without a second clip.
            grad = cond_fn(x, time, **(model_kwargs or {}))
            eps = eps - gaussian.extract(c.sqrt_one_minus_alphas_cumprod, t, x) * grad
            x0 = gaussian.predict_x0_from_eps(c, x, t, eps)
            eps = gaussian.predict_eps_from_x0(c, x, t, x0)
        return eps, x0

    return predict


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
    """DDIM (Song et al. 2021, Eq. 12) from t to t_next for every pair of the grid.

    .. math:: x' = \\sqrt{\\bar\\alpha'}\\,\\hat x_0 + \\sqrt{1 - \\bar\\alpha' - \\sigma^2}\\,
        \\hat\\epsilon + \\sigma z,\\quad \\sigma = \\eta
        \\sqrt{\\tfrac{1 - \\bar\\alpha'}{1 - \\bar\\alpha}}\\sqrt{1 - \\bar\\alpha/\\bar\\alpha'}

    with abar' = 1 at t_next = -1 (so the last step returns x0). eps is re-derived from the
    clipped x0. A learned variance output is accepted and ignored (sigma comes from eta).
    ``cond_fn`` gives score guidance (guided-diffusion ``condition_score``).

    Grids: :func:`ddim_grid` gives denoising-diffusion-pytorch's time pairs on the full table;
    :func:`ddpm_grid` on a table respaced with ``"ddimN"`` or section counts gives
    improved-diffusion's ``ddim_sample_loop``.
    """
    eta_value = _static(eta, float)
    if eta_value is not None and eta_value < 0:
        raise ValueError(f"eta must be >= 0 (0 is deterministic DDIM, 1 is DDPM-like), got {eta}")
    grid = ddpm_grid(c.num_timesteps) if grid is None else grid
    draw = noise_source(key, noise, grid.t.shape[0], x_T, "ddim_sample")
    predict = _eps_x0_predictor(
        model_fn,
        c,
        mean_type=mean_type,
        var_type=var_type,
        clip_denoised=clip_denoised,
        denoised_fn=denoised_fn,
        cond_fn=cond_fn,
        self_condition=self_condition,
        model_kwargs=model_kwargs,
    )

    def step(x, x0_prev, t_scalar, t_next, z):
        eps, x0 = predict(x, t_scalar, x0_prev)
        alpha = c.alphas_cumprod[t_scalar]
        alpha_next = jnp.where(t_next >= 0, c.alphas_cumprod[jnp.maximum(t_next, 0)], 1.0)
        sigma = eta * jnp.sqrt((1 - alpha_next) / (1 - alpha) * (1 - alpha / alpha_next))
        coef = jnp.sqrt(jnp.maximum(1 - alpha_next - sigma**2, 0.0))
        return jnp.sqrt(alpha_next) * x0 + coef * eps + sigma * z, x0

    return run_steps(step, x_T, grid, draw, return_trajectory)


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
    idx = grid.num_steps - 1 - jnp.arange(length, dtype=jnp.int32)
    t_from = grid.t[jnp.clip(idx, 0, length - 1)]
    t_to = grid.t[jnp.clip(idx - 1, 0, length - 1)]
    reverse = TimeGrid(t_from, t_to, grid.num_steps - 1)
    predict = _eps_x0_predictor(
        model_fn,
        c,
        mean_type=mean_type,
        var_type=var_type,
        clip_denoised=clip_denoised,
        denoised_fn=denoised_fn,
        cond_fn=None,
        self_condition=False,
        model_kwargs=model_kwargs,
    )

    def step(x, x0_prev, t_scalar, t_next, _z):
        eps, x0_hat = predict(x, t_scalar, x0_prev)
        alpha_next = c.alphas_cumprod[t_next]
        return jnp.sqrt(alpha_next) * x0_hat + jnp.sqrt(1 - alpha_next) * eps, x0_hat

    zeros = lambda i: jnp.zeros_like(x0)  # noqa: E731 - the reverse chain draws no noise
    return run_steps(step, x0, reverse, zeros, return_trajectory)


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
