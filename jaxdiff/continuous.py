"""Continuous-time Gaussian diffusion in the log-SNR parameterisation (Kingma et al. 2021).

Time t is a float in [0, 1]; a schedule maps it to the log signal-to-noise ratio lambda(t) (see
:func:`jaxdiff.schedules.log_snr_schedule`), and

.. math:: \\alpha^2 = \\mathrm{sigmoid}(\\lambda),\\quad \\sigma^2 = \\mathrm{sigmoid}(-\\lambda),
    \\quad x_t = \\alpha x_0 + \\sigma \\epsilon.

The network receives lambda(t) as its time input, as in denoising-diffusion-pytorch's
``ContinuousTimeGaussianDiffusion`` and ``VParamContinuousTimeGaussianDiffusion``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxdiff import likelihood, samplers

__all__ = [
    "OBJECTIVES",
    "alpha_sigma",
    "continuous_loss",
    "continuous_p_mean_variance",
    "continuous_q_sample",
    "continuous_sample",
]

OBJECTIVES: tuple[str, ...] = ("eps", "v")


def _check_objective(objective: str) -> str:
    if objective not in OBJECTIVES:
        raise ValueError(
            f"unknown continuous-time objective {objective!r}; choose one of {list(OBJECTIVES)}"
        )
    return objective


def _pad(a: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def alpha_sigma(log_snr: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """alpha = sqrt(sigmoid(lambda)), sigma = sqrt(sigmoid(-lambda))."""
    return jnp.sqrt(jax.nn.sigmoid(log_snr)), jnp.sqrt(jax.nn.sigmoid(-log_snr))


def continuous_q_sample(x0: jnp.ndarray, log_snr: jnp.ndarray, noise: jnp.ndarray) -> jnp.ndarray:
    """x_t = alpha x_0 + sigma eps for a [B] log-SNR (Kingma et al. 2021, Eq. 1)."""
    alpha, sigma = alpha_sigma(_pad(log_snr, x0))
    return alpha * x0 + sigma * noise


def continuous_loss(
    model_fn: Callable[..., jnp.ndarray],
    x0: jnp.ndarray,
    times: jnp.ndarray,
    noise: jnp.ndarray,
    *,
    log_snr_fn: Callable[[jnp.ndarray], jnp.ndarray],
    objective: str = "eps",
    min_snr_gamma: float | None = None,
    model_kwargs: dict | None = None,
) -> jnp.ndarray:
    """Per-example continuous-time denoising loss.

    .. math:: L = w(\\lambda)\\,\\mathrm{mean}\\,\\|f_\\theta(x_t, \\lambda) - y\\|^2

    with y = eps (``objective="eps"``) or y = v = alpha eps - sigma x0 (``"v"``, Salimans & Ho
    2022). ``min_snr_gamma`` weights the eps loss by min(snr, gamma) / snr (Hang et al. 2023; as
    ``ContinuousTimeGaussianDiffusion``'s min-SNR option); the v loss is unweighted as in
    ``VParamContinuousTimeGaussianDiffusion``.

    Args:
      model_fn: ``model_fn(x_t, log_snr, **model_kwargs)``, log_snr of shape [B].
      x0: [B, ..., C] data; times: [B] in [0, 1]; noise: standard normal, shape of x0.
      log_snr_fn: t -> lambda(t), e.g. ``jaxdiff.schedules.log_snr_schedule("cosine")``.

    Returns:
      [B] losses.
    """
    objective = _check_objective(objective)
    if min_snr_gamma is not None and objective != "eps":
        raise ValueError("min_snr_gamma applies to the eps objective only (as the reference)")
    if noise.shape != x0.shape or times.shape != x0.shape[:1]:
        raise ValueError(
            f"need noise of shape {x0.shape} and times of shape {x0.shape[:1]}, got "
            f"{noise.shape} and {times.shape}"
        )
    log_snr = log_snr_fn(times)
    x_t = continuous_q_sample(x0, log_snr, noise)
    out = model_fn(x_t, log_snr, **(model_kwargs or {}))
    if out.shape != x0.shape:
        raise ValueError(f"model output has shape {out.shape}, expected {x0.shape}")
    if objective == "eps":
        target = noise
    else:
        alpha, sigma = alpha_sigma(_pad(log_snr, x0))
        target = alpha * noise - sigma * x0
    losses = likelihood.mean_flat(jnp.square(out - target))
    if min_snr_gamma is not None:
        snr = jnp.exp(log_snr)
        losses = losses * jnp.minimum(snr, min_snr_gamma) / snr
    return losses


def continuous_p_mean_variance(
    model_output: jnp.ndarray,
    x: jnp.ndarray,
    log_snr: jnp.ndarray,
    log_snr_next: jnp.ndarray,
    *,
    objective: str = "eps",
    clip_denoised: bool = True,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Mean and variance of p(x_s | x_t) for s < t, from the network output at (x_t, lambda_t).

    .. math:: c = -\\mathrm{expm1}(\\lambda_t - \\lambda_s),\\quad
        \\mu = \\alpha_s\\big(x_t (1 - c)/\\alpha_t + c\\,\\hat x_0\\big),\\quad
        \\sigma^2_{s|t} = \\sigma_s^2 c

    For the eps objective without clipping the mean is written as
    ``alpha_s / alpha_t * (x_t - c sigma_t eps)``, as the reference does.

    Args:
      model_output: network output at x; x: [B, ..., C].
      log_snr, log_snr_next: scalars or [B] log-SNR at t and at the next (less noisy) time.
      objective: ``"eps"`` or ``"v"``.
      clip_denoised: clip x0 to [-1, 1].

    Returns:
      ``(mean, variance)``; the variance broadcasts against x.

    References: Kingma et al. 2021, App. A; denoising-diffusion-pytorch
    ``ContinuousTimeGaussianDiffusion.p_mean_variance``.
    """
    objective = _check_objective(objective)
    log_snr, log_snr_next = _pad(jnp.asarray(log_snr), x), _pad(jnp.asarray(log_snr_next), x)
    c = -jnp.expm1(log_snr - log_snr_next)
    alpha, sigma = alpha_sigma(log_snr)
    alpha_next, sigma_next = alpha_sigma(log_snr_next)
    if objective == "v":
        x0 = alpha * x - sigma * model_output
    else:
        x0 = (x - sigma * model_output) / alpha
    if clip_denoised:
        x0 = jnp.clip(x0, -1.0, 1.0)
    if objective == "eps" and not clip_denoised:
        mean = alpha_next / alpha * (x - c * sigma * model_output)
    else:
        mean = alpha_next * (x * (1 - c) / alpha + c * x0)
    return mean, jnp.square(sigma_next) * c


def continuous_sample(
    model_fn: Callable[..., jnp.ndarray],
    x_T: jnp.ndarray,
    *,
    log_snr_fn: Callable[[jnp.ndarray], jnp.ndarray],
    num_steps,
    max_steps: int | None = None,
    objective: str = "eps",
    clip_denoised: bool = True,
    key: jax.Array | None = None,
    noise: jnp.ndarray | None = None,
    return_trajectory: bool = False,
    model_kwargs: dict | None = None,
) -> samplers.SampleOutput:
    """Ancestral sampling in continuous time over t = linspace(1, 0, N + 1).

    Each step draws x_s ~ N(mu, sigma^2_{s|t}) from :func:`continuous_p_mean_variance`, with no
    noise on the step that reaches t = 0; the result is clipped to [-1, 1] (as
    denoising-diffusion-pytorch's ``p_sample_loop``, which then maps it to [0, 1]; jaxdiff
    leaves it in [-1, 1]). N may be traced: the grid is padded to ``max_steps`` (default N,
    which must then be a Python int) and one compiled sampler serves every N up to it.

    Returns:
      :class:`jaxdiff.samplers.SampleOutput` (with ``return_trajectory``, ``pred_x0`` holds each
      step's unclipped x0 estimate).
    """
    objective = _check_objective(objective)
    if max_steps is None:
        max_steps = samplers.core._static(num_steps)
        if max_steps is None:
            raise ValueError("a traced num_steps needs a static max_steps")
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    n_static = samplers.core._static(num_steps)
    if n_static is not None and not 1 <= n_static <= max_steps:
        raise ValueError(
            f"continuous_sample: the number of steps must be in [1, {max_steps}], got {n_static}"
        )
    n = jnp.asarray(num_steps, jnp.int32)
    length = max_steps if n_static is None else n_static
    times = samplers.torch_linspace(1.0, 0.0, n + 1, length + 1)
    process = samplers.Continuous(log_snr_fn)
    alpha, sigma = process.alpha_sigma(times)
    sigma = jnp.where(times == 0, 0.0, sigma)  # the last step adds no noise
    grid = samplers.Grid(times, alpha, sigma, n if n_static is None else n_static)
    denoiser = samplers.make_denoiser(
        model_fn, process, prediction=objective, clip_denoised=clip_denoised,
        model_kwargs=model_kwargs,
    )  # fmt: skip
    result = samplers.sample(
        samplers.ddpm(), denoiser, x_T, grid, key=key, noise=noise,
        return_trajectory=return_trajectory,
    )  # fmt: skip
    return result._replace(sample=jnp.clip(result.sample, -1.0, 1.0))
