"""Likelihood terms: Gaussian KL, the discretised Gaussian decoder, VB terms and bits/dim.

The variational bound of Ho et al. (2020, Eq. 5) in bits per dimension:

.. math:: L = \\underbrace{D_{KL}(q(x_T|x_0) \\| p(x_T))}_{prior} + \\sum_{t>0}
    \\underbrace{D_{KL}(q(x_{t-1}|x_t,x_0) \\| p(x_{t-1}|x_t))}_{L_{t}}
    \\underbrace{- \\log p(x_0 | x_1)}_{decoder}

Both references use the tanh approximation of the normal CDF inside the decoder; the exact erf
CDF is offered as ``cdf="exact"``. The decoder's tail probabilities are computed without
cancellation by default (``tails="exact"``); ``tails="reference"`` repeats the references'
float32 arithmetic operation for operation, to reproduce their loss and bits/dim numbers
(see :func:`discretized_gaussian_log_likelihood`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxdiff import gaussian
from jaxdiff.gaussian import DiffusionCoeffs

__all__ = [
    "CDFS",
    "TAILS",
    "BpdResult",
    "approx_standard_normal_cdf",
    "calc_bpd_loop",
    "check_tails",
    "discretized_gaussian_log_likelihood",
    "mean_flat",
    "normal_kl",
    "prior_bpd",
    "standard_normal_cdf",
    "vb_terms_bpd",
]

LN2 = math.log(2.0)
CDFS = ("approx", "exact")
TAILS = ("exact", "reference")


def mean_flat(x: jnp.ndarray) -> jnp.ndarray:
    """Mean over every axis but the first (the batch)."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(
    mean1: jnp.ndarray, logvar1: jnp.ndarray, mean2: jnp.ndarray, logvar2: jnp.ndarray
) -> jnp.ndarray:
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats.

    .. math:: \\tfrac12\\big(-1 + \\ell_2 - \\ell_1 + e^{\\ell_1 - \\ell_2}
        + (\\mu_1 - \\mu_2)^2 e^{-\\ell_2}\\big)
    """
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + jnp.exp(logvar1 - logvar2)
        + jnp.square(mean1 - mean2) * jnp.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: jnp.ndarray) -> jnp.ndarray:
    """The tanh approximation of the standard normal CDF used by both references.

    .. math:: \\Phi(x) \\approx \\tfrac12\\big(1 + \\tanh(\\sqrt{2/\\pi}(x + 0.044715 x^3))\\big)
        = \\mathrm{sigmoid}\\big(2\\sqrt{2/\\pi}(x + 0.044715 x^3)\\big)

    Evaluated in the sigmoid form, which keeps its relative accuracy in the lower tail where
    ``1 + tanh`` cancels. Its absolute error against the true CDF is at most ~1.8e-4; see
    :func:`standard_normal_cdf` for the exact one.
    """
    return jax.nn.sigmoid(2.0 * math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3))


def standard_normal_cdf(x: jnp.ndarray) -> jnp.ndarray:
    """The exact standard normal CDF, 0.5 (1 + erf(x / sqrt 2)), accurate in both tails."""
    return jax.scipy.special.ndtr(x)


def _cdf_fn(cdf: str) -> Callable[[jnp.ndarray], jnp.ndarray]:
    if cdf not in CDFS:
        raise ValueError(
            f"unknown cdf {cdf!r}; choose 'approx' (tanh, as both references) or 'exact' (erf)"
        )
    return approx_standard_normal_cdf if cdf == "approx" else standard_normal_cdf


def check_tails(tails: str) -> str:
    """Validate a ``tails=`` option (see :func:`discretized_gaussian_log_likelihood`)."""
    if tails not in TAILS:
        raise ValueError(
            f"unknown tails {tails!r}; choose 'exact' (tail probabilities without cancellation, "
            "the default) or 'reference' (the references' float32 arithmetic, to reproduce "
            "their numbers)"
        )
    return tails


@jax.custom_jvp
def _rounded_tanh(u: jnp.ndarray) -> jnp.ndarray:
    # tanh to within about an ulp of the correctly rounded value, as torch's CPU tanh is. XLA's
    # own tanh is off by several ulps and saturates to +-1 early, which near |tanh| = 1 moves the
    # references' tail probabilities 0.5 (1 - |tanh|) by whole float32 steps of ~6e-8.
    a = jnp.abs(u)
    m = jnp.expm1(2.0 * a)
    return jnp.sign(u) * jnp.where(a < 0.55, m / (m + 2.0), 1.0 - 2.0 / (m + 2.0))


@_rounded_tanh.defjvp
def _rounded_tanh_jvp(primals, tangents):
    # torch's tanh backward, (1 - y^2) from the rounded output y.
    y = _rounded_tanh(primals[0])
    return y, tangents[0] * (1.0 - y * y)


def _reference_tanh_cdf(x: jnp.ndarray) -> jnp.ndarray:
    # The references' own form of the tanh CDF: 1 + tanh(u) cancels in the lower tail.
    return 0.5 * (1.0 + _rounded_tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _reference_tails_log_likelihood(x, means, log_scales, cdf, log_floor, threshold):
    dtype = jnp.result_type(x, means, log_scales)
    x, means, log_scales = (a.astype(jnp.float32) for a in (x, means, log_scales))
    phi = _reference_tanh_cdf if cdf == "approx" else standard_normal_cdf
    centered = x - means
    inv_stdv = jnp.exp(-log_scales)
    cdf_plus = phi(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = phi(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, log_floor))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, log_floor))
    log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, log_floor))
    out = jnp.where(
        x < -threshold,
        log_cdf_plus,
        jnp.where(x > threshold, log_one_minus_cdf_min, log_cdf_delta),
    )
    return out.astype(dtype)


def discretized_gaussian_log_likelihood(
    x: jnp.ndarray,
    *,
    means: jnp.ndarray,
    log_scales: jnp.ndarray,
    cdf: str = "approx",
    log_floor: float = 1e-12,
    threshold: float = 0.999,
    tails: str = "exact",
) -> jnp.ndarray:
    """Log-likelihood (nats) of 8-bit data scaled to [-1, 1] under a discretised Gaussian.

    Each of the 256 values owns the bin x +- 1/255; the edge bins extend to -inf and +inf:

    .. math:: \\log p(x) = \\log\\big(\\Phi(\\tfrac{x - \\mu + 1/255}{s})
        - \\Phi(\\tfrac{x - \\mu - 1/255}{s})\\big)

    Every probability is floored at ``log_floor`` before its log (1e-12 in improved-diffusion,
    1e-15 in denoising-diffusion-pytorch's ``LearnedGaussianDiffusion``), which also keeps the
    unused branches finite so that gradients through ``where`` stay finite.

    With :math:`z_\\pm = (x - \\mu \\pm 1/255)/s`, :math:`\\epsilon` = ``log_floor`` and
    :math:`\\tau` = ``threshold``, the two ``tails`` modes are:

    * ``"exact"`` (default): every probability keeps float32's relative accuracy, using the
      symmetry :math:`1 - \\Phi(z) = \\Phi(-z)`:

      .. math:: \\log p = \\begin{cases} \\log\\max(\\Phi(z_+), \\epsilon) & x < -\\tau \\\\
          \\log\\max(\\Phi(-z_-), \\epsilon) & x > \\tau \\\\
          \\log\\max(\\Phi(-z_-) - \\Phi(-z_+), \\epsilon) & z_- > 0 \\\\
          \\log\\max(\\Phi(z_+) - \\Phi(z_-), \\epsilon) & \\text{otherwise} \\end{cases}

    * ``"reference"``: the references' own float32 arithmetic, operation for operation (inputs
      cast to float32; with ``cdf="approx"`` the CDF is evaluated as the references write it,
      :math:`\\tfrac12(1 + \\tanh(\\cdot))`), so that their loss and bits/dim numbers are
      reproduced to float32 rounding:

      .. math:: \\log p = \\begin{cases} \\log\\max(\\Phi(z_+), \\epsilon) & x < -\\tau \\\\
          \\log\\max(1 - \\Phi(z_-), \\epsilon) & x > \\tau \\\\
          \\log\\max(\\Phi(z_+) - \\Phi(z_-), \\epsilon) & \\text{otherwise} \\end{cases}

      ``1 - Phi(z)`` and bins above the mean are then differences of CDF values close to 1,
      which float32 resolves only to ~6e-8: a bin of probability p gets a relative error of
      ~6e-8 / p, and bins with p below ~6e-8 can fall to the floor (or, in the lower tail of
      the tanh form, where ``1 + tanh`` cancels, a tiny ``Phi(z_+)`` likewise). Where p is not
      tiny the two modes agree to rounding; they differ where a model fits poorly (e.g. the
      decoder at t = 0 of an untrained network).

    Args:
      x: data on the 256-value grid in [-1, 1].
      means, log_scales: the Gaussian's mean and log standard deviation (same shape as x).
      cdf: ``"approx"`` (tanh; both references) or ``"exact"`` (erf).
      log_floor: floor of each probability.
      threshold: |x| above which a value is an edge bin.
      tails: ``"exact"`` or ``"reference"``, as above. Only ``cdf="approx"`` with
        ``tails="reference"`` reproduces the references' numbers.

    Returns:
      elementwise log-likelihoods in nats, shape of x.

    References: Ho et al. 2020, Eq. 13; improved-diffusion ``losses.py``.
    """
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(
            "x, means and log_scales must have the same shape, got "
            f"{x.shape}, {means.shape}, {log_scales.shape}"
        )
    phi = _cdf_fn(cdf)
    if check_tails(tails) == "reference":
        return _reference_tails_log_likelihood(x, means, log_scales, cdf, log_floor, threshold)
    centered = x - means
    inv_stdv = jnp.exp(-log_scales)
    plus_in = inv_stdv * (centered + 1.0 / 255.0)
    min_in = inv_stdv * (centered - 1.0 / 255.0)
    cdf_plus = phi(plus_in)
    one_minus_cdf_min = phi(-min_in)
    # Above the mean, take the bin mass as a difference of upper-tail probabilities.
    cdf_delta = jnp.where(min_in > 0, one_minus_cdf_min - phi(-plus_in), cdf_plus - phi(min_in))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, log_floor))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(one_minus_cdf_min, log_floor))
    log_cdf_delta = jnp.log(jnp.maximum(cdf_delta, log_floor))
    return jnp.where(
        x < -threshold,
        log_cdf_plus,
        jnp.where(x > threshold, log_one_minus_cdf_min, log_cdf_delta),
    )


def vb_terms_bpd(
    c: DiffusionCoeffs,
    model_output: jnp.ndarray,
    x0: jnp.ndarray,
    x_t: jnp.ndarray,
    t: jnp.ndarray,
    *,
    mean_type: str = "eps",
    var_type: str = "fixed_small",
    clip_denoised: bool = False,
    cdf: str = "approx",
    log_floor: float = 1e-12,
    tails: str = "exact",
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """One term of the variational bound, in bits per dimension.

    .. math:: L_t = \\begin{cases} -\\log_2 p(x_0 | x_1) & t = 0 \\\\
        D_{KL}(q(x_{t-1}|x_t,x_0) \\| p(x_{t-1}|x_t)) / \\ln 2 & t > 0 \\end{cases}

    averaged over every non-batch axis.

    Args:
      c: coefficient table.
      model_output: the network output at (x_t, t) (2C channels for learned variances).
      x0: [B, ..., C] data on the 256-value grid; x_t: the noised data; t: [B] timesteps.
      mean_type, var_type, clip_denoised: as :func:`jaxdiff.gaussian.p_mean_variance`.
      cdf, log_floor, tails: as :func:`discretized_gaussian_log_likelihood`
        (``tails="reference"`` reproduces improved-diffusion's float32 ``_vb_terms_bpd``).

    Returns:
      ``(bpd, pred_x0)``: [B] bits/dim and the model's x0.

    References: Nichol & Dhariwal 2021, Eq. 4-6; improved-diffusion ``_vb_terms_bpd``.
    """
    check_tails(tails)
    true_mean, _, true_log_variance = gaussian.q_posterior_mean_variance(c, x0, x_t, t)
    out = gaussian.p_mean_variance(
        c,
        model_output,
        x_t,
        t,
        mean_type=mean_type,
        var_type=var_type,
        clip_denoised=clip_denoised,
    )
    kl = mean_flat(normal_kl(true_mean, true_log_variance, out.mean, out.log_variance)) / LN2
    decoder_nll = (
        -mean_flat(
            discretized_gaussian_log_likelihood(
                x0,
                means=out.mean,
                log_scales=0.5 * out.log_variance,
                cdf=cdf,
                log_floor=log_floor,
                tails=tails,
            )
        )
        / LN2
    )
    return jnp.where(t == 0, decoder_nll, kl), out.pred_x0


def prior_bpd(c: DiffusionCoeffs, x0: jnp.ndarray) -> jnp.ndarray:
    """KL(q(x_T | x_0) || N(0, I)) in bits/dim, shape [B]; not trainable, close to 0."""
    t = jnp.full((x0.shape[0],), c.num_timesteps - 1, dtype=jnp.int32)
    mean, _, log_variance = gaussian.q_mean_variance(c, x0, t)
    zeros = jnp.zeros_like(mean)
    return mean_flat(normal_kl(mean, log_variance, zeros, zeros)) / LN2


class BpdResult(NamedTuple):
    """Output of :func:`calc_bpd_loop`. Per-timestep arrays are indexed by timestep: ``vb[:, t]``.

    (improved-diffusion stacks them in loop order, so its column j is timestep T - 1 - j.)
    """

    total_bpd: jnp.ndarray  # [B]
    prior_bpd: jnp.ndarray  # [B]
    vb: jnp.ndarray  # [B, T]
    xstart_mse: jnp.ndarray  # [B, T]
    mse: jnp.ndarray  # [B, T] eps MSE, eps re-derived from the (clipped) x0


def calc_bpd_loop(
    model_fn: Callable[..., jnp.ndarray],
    c: DiffusionCoeffs,
    x0: jnp.ndarray,
    *,
    key: jax.Array | None = None,
    noise: jnp.ndarray | None = None,
    mean_type: str = "eps",
    var_type: str = "fixed_small",
    clip_denoised: bool = True,
    cdf: str = "approx",
    tails: str = "exact",
    model_kwargs: dict | None = None,
) -> BpdResult:
    """The full variational bound in bits/dim: every timestep's term plus the prior.

    One network call per timestep, run as a single ``lax.scan`` from t = T-1 down to 0. Each
    step draws its own noise, ``normal(fold_in(key, t))``, unless ``noise`` [T, *x0.shape] is
    given (``noise[t]`` is used at timestep t).

    Args:
      model_fn: ``model_fn(x_t, time, **model_kwargs)`` with ``time = c.model_times[t]`` [B].
      c: coefficient table (respaced tables give the bound of the respaced chain).
      x0: [B, ..., C] data on the 256-value grid in [-1, 1].
      key / noise: randomness, exactly one of them.
      mean_type, var_type, clip_denoised, cdf, tails: as :func:`vb_terms_bpd`
        (``tails="reference"`` reproduces improved-diffusion's float32 ``calc_bpd_loop``).

    Returns:
      :class:`BpdResult`.

    References: Nichol & Dhariwal 2021, Sec. 3.2; improved-diffusion ``calc_bpd_loop``.
    """
    if (key is None) == (noise is None):
        raise ValueError("calc_bpd_loop needs exactly one of key= or noise=")
    check_tails(tails)
    num_steps = c.num_timesteps
    if noise is not None and noise.shape != (num_steps, *x0.shape):
        raise ValueError(
            f"noise must have shape {(num_steps, *x0.shape)} ([T, *x0.shape]), got {noise.shape}"
        )
    model_kwargs = model_kwargs or {}
    batch = x0.shape[0]

    def step(carry, t_scalar):
        t = jnp.full((batch,), t_scalar, dtype=jnp.int32)
        eps = (
            noise[t_scalar]
            if noise is not None
            else jax.random.normal(jax.random.fold_in(key, t_scalar), x0.shape, x0.dtype)
        )
        x_t = gaussian.q_sample(c, x0, t, eps)
        out = model_fn(x_t, c.model_times[t], **model_kwargs)
        vb, pred_x0 = vb_terms_bpd(
            c,
            out,
            x0,
            x_t,
            t,
            mean_type=mean_type,
            var_type=var_type,
            clip_denoised=clip_denoised,
            cdf=cdf,
            tails=tails,
        )
        xstart_mse = mean_flat(jnp.square(pred_x0 - x0))
        eps_hat = gaussian.predict_eps_from_x0(c, x_t, t, pred_x0)
        mse = mean_flat(jnp.square(eps_hat - eps))
        return carry, (vb, xstart_mse, mse)

    steps = jnp.arange(num_steps - 1, -1, -1, dtype=jnp.int32)
    _, (vb, xstart_mse, mse) = jax.lax.scan(step, None, steps)
    # Loop order is T-1 .. 0; flip so that column t is timestep t.
    vb, xstart_mse, mse = (jnp.flip(a, axis=0).T for a in (vb, xstart_mse, mse))
    prior = prior_bpd(c, x0)
    return BpdResult(jnp.sum(vb, axis=1) + prior, prior, vb, xstart_mse, mse)
