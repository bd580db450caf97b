"""The discrete Gaussian diffusion process in closed form.

A :class:`DiffusionCoeffs` table (a pytree of [T] arrays) holds every per-timestep coefficient,
built in float64 on the host and cast once. The functions below are the process math of Ho et
al. (2020) and Nichol & Dhariwal (2021): the forward marginal q(x_t | x_0), the posterior
q(x_{t-1} | x_t, x_0), conversions between the eps / x0 / v parameterisations, and the reverse
step's mean and variance p(x_{t-1} | x_t) for every mean and variance type.

Arrays are channels-last (NHWC or any [B, ..., C]); ``t`` is an int array of shape [B].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from jaxdiff import schedules

__all__ = [
    "CONVENTIONS",
    "MEAN_TYPES",
    "VAR_TYPES",
    "DiffusionCoeffs",
    "PMeanVariance",
    "canonical_mean_type",
    "canonical_var_type",
    "extract",
    "make_coeffs",
    "model_predictions",
    "p_mean_variance",
    "predict_eps_from_v",
    "predict_eps_from_x0",
    "predict_v",
    "predict_x0_from_eps",
    "predict_x0_from_v",
    "predict_x0_from_xprev",
    "q_mean_variance",
    "q_posterior_mean_variance",
    "q_sample",
    "split_model_output",
]

# Accepted names, mapped to the canonical one. The aliases are the spellings of both references
# (improved-diffusion's ModelMeanType members, denoising-diffusion-pytorch's objectives).
MEAN_TYPES: dict[str, str] = {
    "eps": "eps",
    "epsilon": "eps",
    "pred_noise": "eps",
    "x0": "x0",
    "start_x": "x0",
    "pred_x0": "x0",
    "v": "v",
    "pred_v": "v",
    "prev_x": "prev_x",
    "previous_x": "prev_x",
}
VAR_TYPES: tuple[str, ...] = ("fixed_small", "fixed_large", "learned", "learned_range")
CONVENTIONS: tuple[str, ...] = ("openai", "lucidrains")


def canonical_mean_type(mean_type: str) -> str:
    """Validate a mean type / objective name and return its canonical spelling."""
    key = mean_type.lower() if isinstance(mean_type, str) else mean_type
    if key not in MEAN_TYPES:
        raise ValueError(
            f"unknown mean type {mean_type!r}; choose one of {sorted(set(MEAN_TYPES.values()))} "
            f"(aliases: {sorted(k for k in MEAN_TYPES if k not in MEAN_TYPES.values())})"
        )
    return MEAN_TYPES[key]


def canonical_var_type(var_type: str) -> str:
    """Validate a variance type name and return it in lower case."""
    key = var_type.lower() if isinstance(var_type, str) else var_type
    if key not in VAR_TYPES:
        raise ValueError(f"unknown variance type {var_type!r}; choose one of {list(VAR_TYPES)}")
    return key


class DiffusionCoeffs(NamedTuple):
    """Per-timestep coefficients of a discrete process; every field has shape [T].

    Index t = 0..T-1 is the code's timestep (the paper's t + 1). ``model_times`` is what the
    network receives for step t: the original timestep for a respaced chain, times 1000 / T_orig
    when ``rescale_timesteps`` (improved-diffusion's ``_WrappedModel``).
    """

    betas: jnp.ndarray
    log_betas: jnp.ndarray
    alphas_cumprod: jnp.ndarray
    alphas_cumprod_prev: jnp.ndarray  # [1, abar_0, ..., abar_{T-2}]
    alphas_cumprod_next: jnp.ndarray  # [abar_1, ..., abar_{T-1}, 0]
    sqrt_alphas_cumprod: jnp.ndarray
    sqrt_one_minus_alphas_cumprod: jnp.ndarray
    log_one_minus_alphas_cumprod: jnp.ndarray
    sqrt_recip_alphas_cumprod: jnp.ndarray
    sqrt_recipm1_alphas_cumprod: jnp.ndarray
    posterior_variance: jnp.ndarray  # beta-tilde; exactly 0 at t = 0
    posterior_log_variance_clipped: jnp.ndarray  # index 0 depends on the convention
    posterior_mean_coef1: jnp.ndarray
    posterior_mean_coef2: jnp.ndarray
    large_variance: jnp.ndarray  # FIXED_LARGE: [beta-tilde_1, beta_1, ..., beta_{T-1}]
    large_log_variance: jnp.ndarray
    snr: jnp.ndarray  # abar / (1 - abar)
    model_times: jnp.ndarray

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]


def make_coeffs(
    betas: np.ndarray | Sequence[float],
    *,
    respacing: str | Sequence[int] | None = None,
    convention: str = "openai",
    rescale_timesteps: bool = False,
    dtype: jnp.dtype = jnp.float32,
) -> DiffusionCoeffs:
    """Build the coefficient table of a process in float64 on the host, then cast it once.

    .. math:: \\bar\\alpha_t = \\prod_{s \\le t} (1 - \\beta_s),\\quad
        \\tilde\\beta_t = \\beta_t \\frac{1 - \\bar\\alpha_{t-1}}{1 - \\bar\\alpha_t},\\quad
        \\tilde\\mu_t = \\frac{\\beta_t \\sqrt{\\bar\\alpha_{t-1}}}{1 - \\bar\\alpha_t} x_0
        + \\frac{(1 - \\bar\\alpha_{t-1}) \\sqrt{\\alpha_t}}{1 - \\bar\\alpha_t} x_t

    Args:
      betas: [T] betas of the original process, e.g. from
        :func:`jaxdiff.schedules.get_named_beta_schedule`.
      respacing: optional improved-diffusion respacing (``"ddim50"``, ``"10,15,20"``, a list of
        counts); the table then describes the respaced chain and ``model_times`` maps each new
        step to its original timestep.
      convention: how ``log(beta-tilde)`` is made finite at t = 0, where beta-tilde is 0.
        ``"openai"`` copies index 1 into index 0 (improved-diffusion); ``"lucidrains"`` floors
        beta-tilde at 1e-20, so index 0 is log(1e-20) (denoising-diffusion-pytorch). This also
        sets the lower end of the learned-range variance.
      rescale_timesteps: feed the network ``t * 1000 / T_orig`` (improved-diffusion's
        ``rescale_timesteps=True``) instead of the integer timestep.
      dtype: compute dtype of the table.

    Returns:
      the :class:`DiffusionCoeffs` table.

    References: Ho et al. 2020, Eq. 4, 6, 7; Nichol & Dhariwal 2021, Sec. 3.1;
    improved-diffusion ``GaussianDiffusion.__init__``; denoising-diffusion-pytorch
    ``GaussianDiffusion.__init__``.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown convention {convention!r}; choose one of {list(CONVENTIONS)}")
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.shape[0] < 1:
        raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
    if not np.all((betas > 0) & (betas <= 1)):
        raise ValueError(
            f"betas must lie in (0, 1], got min {betas.min():.6g} and max {betas.max():.6g} "
            "(the linear schedule scales its betas by 1000/T, so it needs T >= 20)"
        )
    original_steps = betas.shape[0]
    timestep_map = np.arange(original_steps, dtype=np.int64)
    if respacing is not None:
        kept = schedules.space_timesteps(original_steps, respacing)
        betas, timestep_map = schedules.respace_betas(betas, kept)

    num_steps = betas.shape[0]
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    alphas_cumprod_next = np.append(alphas_cumprod[1:], 0.0)
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    # beta-tilde_1 stands in for the zero at t = 0; a one-step chain has no beta-tilde_1, so its
    # beta_0 is used instead.
    first_variance = posterior_variance[1] if num_steps > 1 else betas[0]
    if convention == "openai":
        posterior_log_variance_clipped = np.log(np.append(first_variance, posterior_variance[1:]))
    else:
        posterior_log_variance_clipped = np.log(np.maximum(posterior_variance, 1e-20))
    large_variance = np.append(first_variance, betas[1:])
    times = timestep_map.astype(np.float64)
    if rescale_timesteps:
        # improved-diffusion multiplies a float32 timestep by 1000 / T in float32.
        times = timestep_map.astype(np.float32) * np.float32(1000.0 / original_steps)

    # A last beta of exactly 1 (zero terminal SNR, e.g. the linear schedule at T = 20) is allowed:
    # the 1/abar entries of that step are then inf, as in the references, and only the v
    # parameterisation is defined there.
    with np.errstate(divide="ignore", invalid="ignore"):
        table = DiffusionCoeffs(
            betas=betas,
            log_betas=np.log(betas),
            alphas_cumprod=alphas_cumprod,
            alphas_cumprod_prev=alphas_cumprod_prev,
            alphas_cumprod_next=alphas_cumprod_next,
            sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
            log_one_minus_alphas_cumprod=np.log(1.0 - alphas_cumprod),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1.0),
            posterior_variance=posterior_variance,
            posterior_log_variance_clipped=posterior_log_variance_clipped,
            posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            posterior_mean_coef2=(1.0 - alphas_cumprod_prev)
            * np.sqrt(alphas)
            / (1.0 - alphas_cumprod),
            large_variance=large_variance,
            large_log_variance=np.log(large_variance),
            snr=alphas_cumprod / (1.0 - alphas_cumprod),
            model_times=times,
        )
    return DiffusionCoeffs(*(jnp.asarray(np.asarray(a, dtype=np.float64), dtype) for a in table))


def extract(table: jnp.ndarray, t: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
    """Gather ``table[t]`` and append singleton axes so that it broadcasts against ``x``."""
    values = table[t]
    return values.reshape(values.shape + (1,) * (x.ndim - values.ndim))


# --------------------------------------------------------------------------------------------
# Forward process and posterior
# --------------------------------------------------------------------------------------------


def q_mean_variance(
    c: DiffusionCoeffs, x0: jnp.ndarray, t: jnp.ndarray
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Mean, variance and log-variance of q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I).

    Ho et al. 2020, Eq. 4. Returns arrays broadcast to ``x0``'s shape.
    """
    mean = extract(c.sqrt_alphas_cumprod, t, x0) * x0
    variance = jnp.broadcast_to(extract(1.0 - c.alphas_cumprod, t, x0), x0.shape)
    log_variance = jnp.broadcast_to(extract(c.log_one_minus_alphas_cumprod, t, x0), x0.shape)
    return mean, variance, log_variance


def q_sample(
    c: DiffusionCoeffs, x0: jnp.ndarray, t: jnp.ndarray, noise: jnp.ndarray
) -> jnp.ndarray:
    """Sample x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (Ho et al. 2020, Eq. 4)."""
    return (
        extract(c.sqrt_alphas_cumprod, t, x0) * x0
        + extract(c.sqrt_one_minus_alphas_cumprod, t, x0) * noise
    )


def q_posterior_mean_variance(
    c: DiffusionCoeffs, x0: jnp.ndarray, x_t: jnp.ndarray, t: jnp.ndarray
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (Ho et al. 2020, Eq. 7).

    .. math:: \\tilde\\mu_t = c_1 x_0 + c_2 x_t,\\quad \\tilde\\beta_t =
        \\beta_t (1 - \\bar\\alpha_{t-1}) / (1 - \\bar\\alpha_t)
    """
    mean = (
        extract(c.posterior_mean_coef1, t, x_t) * x0 + extract(c.posterior_mean_coef2, t, x_t) * x_t
    )
    variance = jnp.broadcast_to(extract(c.posterior_variance, t, x_t), x_t.shape)
    log_variance = jnp.broadcast_to(extract(c.posterior_log_variance_clipped, t, x_t), x_t.shape)
    return mean, variance, log_variance


# --------------------------------------------------------------------------------------------
# Parameterisation conversions
# --------------------------------------------------------------------------------------------


def predict_x0_from_eps(
    c: DiffusionCoeffs, x_t: jnp.ndarray, t: jnp.ndarray, eps: jnp.ndarray
) -> jnp.ndarray:
    """x_0 = sqrt(1 / abar_t) x_t - sqrt(1 / abar_t - 1) eps (Ho et al. 2020, Eq. 4 inverted)."""
    return (
        extract(c.sqrt_recip_alphas_cumprod, t, x_t) * x_t
        - extract(c.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
    )


def predict_eps_from_x0(
    c: DiffusionCoeffs, x_t: jnp.ndarray, t: jnp.ndarray, x0: jnp.ndarray
) -> jnp.ndarray:
    """eps = (sqrt(1 / abar_t) x_t - x_0) / sqrt(1 / abar_t - 1)."""
    return (extract(c.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0) / extract(
        c.sqrt_recipm1_alphas_cumprod, t, x_t
    )


def predict_v(c: DiffusionCoeffs, x0: jnp.ndarray, t: jnp.ndarray, eps: jnp.ndarray) -> jnp.ndarray:
    """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022, App. D)."""
    return (
        extract(c.sqrt_alphas_cumprod, t, x0) * eps
        - extract(c.sqrt_one_minus_alphas_cumprod, t, x0) * x0
    )


def predict_x0_from_v(
    c: DiffusionCoeffs, x_t: jnp.ndarray, t: jnp.ndarray, v: jnp.ndarray
) -> jnp.ndarray:
    """x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v."""
    return (
        extract(c.sqrt_alphas_cumprod, t, x_t) * x_t
        - extract(c.sqrt_one_minus_alphas_cumprod, t, x_t) * v
    )


def predict_eps_from_v(
    c: DiffusionCoeffs, x_t: jnp.ndarray, t: jnp.ndarray, v: jnp.ndarray
) -> jnp.ndarray:
    """eps = sqrt(1 - abar_t) x_t + sqrt(abar_t) v."""
    return (
        extract(c.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t
        + extract(c.sqrt_alphas_cumprod, t, x_t) * v
    )


def predict_x0_from_xprev(
    c: DiffusionCoeffs, x_t: jnp.ndarray, t: jnp.ndarray, xprev: jnp.ndarray
) -> jnp.ndarray:
    """Invert the posterior mean: x_0 = (mu - c_2 x_t) / c_1 (improved-diffusion PREVIOUS_X).

    Undefined where c_1 = 0, which no schedule in this library produces (c_1 = 1 at t = 0).
    """
    return (xprev - extract(c.posterior_mean_coef2, t, x_t) * x_t) / extract(
        c.posterior_mean_coef1, t, x_t
    )


# --------------------------------------------------------------------------------------------
# The reverse step
# --------------------------------------------------------------------------------------------


class PMeanVariance(NamedTuple):
    """Output of :func:`p_mean_variance`; every field has the shape of x_t."""

    mean: jnp.ndarray
    variance: jnp.ndarray
    log_variance: jnp.ndarray
    pred_x0: jnp.ndarray


def split_model_output(
    model_output: jnp.ndarray, x_t: jnp.ndarray, var_type: str
) -> tuple[jnp.ndarray, jnp.ndarray | None]:
    """Split a network output into its mean part and (for learned variances) its variance part.

    Learned variance types need 2C output channels on the last axis (mean first, then the
    variance values); fixed ones need C. Anything else is a ValueError naming the shapes.
    """
    var_type = canonical_var_type(var_type)
    learned = var_type in ("learned", "learned_range")
    channels = x_t.shape[-1]
    want = x_t.shape[:-1] + ((2 * channels,) if learned else (channels,))
    if model_output.shape != want:
        detail = (
            f"{2 * channels} channels (mean and variance, last axis) for var_type {var_type!r}"
            if learned
            else f"{channels} channels for var_type {var_type!r}"
        )
        raise ValueError(
            f"model output has shape {tuple(model_output.shape)}, expected {want}: {detail}"
        )
    if not learned:
        return model_output, None
    return model_output[..., :channels], model_output[..., channels:]


def _mean_to_x0(
    c: DiffusionCoeffs, mean_type: str, out: jnp.ndarray, x_t: jnp.ndarray, t: jnp.ndarray
) -> jnp.ndarray:
    if mean_type == "eps":
        return predict_x0_from_eps(c, x_t, t, out)
    if mean_type == "v":
        return predict_x0_from_v(c, x_t, t, out)
    if mean_type == "prev_x":
        return predict_x0_from_xprev(c, x_t, t, out)
    return out


def model_predictions(
    c: DiffusionCoeffs,
    mean_output: jnp.ndarray,
    x_t: jnp.ndarray,
    t: jnp.ndarray,
    *,
    mean_type: str = "eps",
    clip_denoised: bool = False,
    rederive_eps: bool = True,
    denoised_fn: Callable[[jnp.ndarray], jnp.ndarray] | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The network's (eps, x0) prediction, with x0 processed and eps made consistent with it.

    x0 comes from the output in its parameterisation, goes through ``denoised_fn`` and, when
    ``clip_denoised``, is clipped to [-1, 1]; eps is re-derived from that x0 (Song et al. 2021,
    Eq. 12 as improved-diffusion's ``ddim_sample``), except for an eps output with
    ``rederive_eps=False`` (denoising-diffusion-pytorch's ``model_predictions`` option).

    Args:
      c: coefficient table.
      mean_output: the mean part of the network output (see :func:`split_model_output`).
      x_t: [B, ..., C] noisy input; t: [B] timesteps.

    Returns:
      ``(eps, x0)``.
    """
    mean_type = canonical_mean_type(mean_type)
    x0 = _mean_to_x0(c, mean_type, mean_output, x_t, t)
    if denoised_fn is not None:
        x0 = denoised_fn(x0)
    if clip_denoised:
        x0 = jnp.clip(x0, -1.0, 1.0)
    processed = clip_denoised or denoised_fn is not None
    if mean_type == "eps" and not (processed and rederive_eps):
        return mean_output, x0
    return predict_eps_from_x0(c, x_t, t, x0), x0


def p_mean_variance(
    c: DiffusionCoeffs,
    model_output: jnp.ndarray,
    x_t: jnp.ndarray,
    t: jnp.ndarray,
    *,
    mean_type: str = "eps",
    var_type: str = "fixed_small",
    clip_denoised: bool = True,
    denoised_fn: Callable[[jnp.ndarray], jnp.ndarray] | None = None,
) -> PMeanVariance:
    """Mean and variance of the reverse step p(x_{t-1} | x_t) from a network output.

    Variance types (Nichol & Dhariwal 2021, Sec. 3.1):

    * ``fixed_small``: beta-tilde_t (log clipped at t = 0 per the table's convention);
    * ``fixed_large``: beta_t, with beta-tilde_1 at t = 0;
    * ``learned``: the extra C output channels are the log-variance;
    * ``learned_range``: the extra channels v in [-1, 1] interpolate in log space,
      :math:`\\log\\sigma^2 = \\tfrac{v+1}{2} \\log\\beta_t + \\tfrac{1-v}{2}\\log\\tilde\\beta_t`.

    Mean types: ``eps``, ``x0`` and ``v`` give the posterior mean of the processed x0
    (``denoised_fn``, then the clip to [-1, 1]); ``prev_x`` uses the output as the mean and
    recovers x0 from it.

    Args:
      c: coefficient table.
      model_output: [B, ..., C] or, for learned variances, [B, ..., 2C].
      x_t: [B, ..., C]; t: [B] int timesteps.

    Returns:
      :class:`PMeanVariance` (mean, variance, log_variance, pred_x0).

    References: improved-diffusion ``GaussianDiffusion.p_mean_variance``;
    denoising-diffusion-pytorch ``GaussianDiffusion.p_mean_variance``.
    """
    mean_type = canonical_mean_type(mean_type)
    var_type = canonical_var_type(var_type)
    mean_out, var_out = split_model_output(model_output, x_t, var_type)

    if var_type == "learned":
        log_variance = var_out
    elif var_type == "learned_range":
        frac = (var_out + 1.0) / 2.0
        log_variance = frac * extract(c.log_betas, t, x_t) + (1.0 - frac) * extract(
            c.posterior_log_variance_clipped, t, x_t
        )
    else:
        table = (
            c.posterior_log_variance_clipped if var_type == "fixed_small" else c.large_log_variance
        )
        log_variance = jnp.broadcast_to(extract(table, t, x_t), x_t.shape)
    if var_type == "fixed_small":
        variance = jnp.broadcast_to(extract(c.posterior_variance, t, x_t), x_t.shape)
    elif var_type == "fixed_large":
        variance = jnp.broadcast_to(extract(c.large_variance, t, x_t), x_t.shape)
    else:
        variance = jnp.exp(log_variance)

    _, pred_x0 = model_predictions(
        c,
        mean_out,
        x_t,
        t,
        mean_type=mean_type,
        clip_denoised=clip_denoised,
        denoised_fn=denoised_fn,
    )
    if mean_type == "prev_x":
        mean = mean_out
    else:
        mean, _, _ = q_posterior_mean_variance(c, pred_x0, x_t, t)
    return PMeanVariance(mean, variance, log_variance, pred_x0)
