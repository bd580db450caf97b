"""Per-example training losses of both references, and openai's timestep importance sampler.

Every loss takes a ``model_fn(x_t, time, **kwargs) -> output`` and explicit noise, returns one
value per example (shape [B]) and is jit- and grad-able. Reduce over the batch yourself (a plain
mean, or a mean weighted by the importance weights of :func:`sample_timesteps`).

* :func:`simple_loss`: denoising-diffusion-pytorch's ``GaussianDiffusion.p_losses`` (eps / x0 /
  v objectives with their SNR weights, min-SNR-gamma, offset noise).
* :func:`training_losses`: improved-diffusion's ``training_losses`` (mse / rescaled_mse / kl /
  rescaled_kl, and the hybrid loss for learned variances), which also gives
  denoising-diffusion-pytorch's ``LearnedGaussianDiffusion`` loss (see its docstring).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxdiff import gaussian, likelihood
from jaxdiff.gaussian import DiffusionCoeffs

__all__ = [
    "LOSS_TYPES",
    "LossSecondMomentState",
    "loss_second_moment_init",
    "loss_second_moment_update",
    "loss_second_moment_weights",
    "loss_weight",
    "sample_timesteps",
    "simple_loss",
    "training_losses",
]

LOSS_TYPES: tuple[str, ...] = ("mse", "rescaled_mse", "kl", "rescaled_kl")


def loss_weight(
    snr: jnp.ndarray, objective: str, min_snr_gamma: float | None = None
) -> jnp.ndarray:
    """Per-timestep weight that makes each objective's MSE an eps-MSE (times min-SNR clipping).

    With :math:`\\gamma` = ``min_snr_gamma`` (Hang et al. 2023; off when None) and
    :math:`\\bar s = \\min(\\mathrm{snr}, \\gamma)`:

    * eps: :math:`\\bar s / \\mathrm{snr}` (1 when off);
    * x0: :math:`\\bar s` (snr when off);
    * v: :math:`\\bar s / (\\mathrm{snr} + 1)` (abar when off).

    The eps weight is written as ``where(snr > gamma, gamma / snr, 1)`` so that a zero terminal
    SNR gives 1, not 0/0.

    References: denoising-diffusion-pytorch ``GaussianDiffusion.__init__`` (``loss_weight``).
    """
    objective = gaussian.canonical_mean_type(objective)
    if objective == "prev_x":
        raise ValueError("SNR loss weights exist for the eps, x0 and v objectives, not prev_x")
    if min_snr_gamma is not None and min_snr_gamma <= 0:
        raise ValueError(f"min_snr_gamma must be > 0 or None, got {min_snr_gamma}")
    clipped = snr if min_snr_gamma is None else jnp.minimum(snr, min_snr_gamma)
    if objective == "eps":
        if min_snr_gamma is None:
            return jnp.ones_like(snr)
        return jnp.where(snr > min_snr_gamma, min_snr_gamma / jnp.maximum(snr, 1e-30), 1.0)
    if objective == "x0":
        return clipped
    return clipped / (snr + 1.0)


def _check_image_inputs(x0: jnp.ndarray, t: jnp.ndarray, noise: jnp.ndarray) -> None:
    if noise.shape != x0.shape:
        raise ValueError(f"noise must have the shape of x0 {x0.shape}, got {noise.shape}")
    if t.shape != x0.shape[:1]:
        raise ValueError(f"t must have shape [B] = {x0.shape[:1]}, got {t.shape}")


def simple_loss(
    model_fn: Callable[..., jnp.ndarray],
    c: DiffusionCoeffs,
    x0: jnp.ndarray,
    t: jnp.ndarray,
    noise: jnp.ndarray,
    *,
    objective: str = "eps",
    min_snr_gamma: float | None = None,
    offset_noise: jnp.ndarray | None = None,
    offset_noise_strength: float = 0.0,
    model_kwargs: dict | None = None,
) -> jnp.ndarray:
    """Weighted denoising MSE, per example (denoising-diffusion-pytorch's ``p_losses``).

    .. math:: L = w_t \\cdot \\mathrm{mean}\\,\\| f_\\theta(x_t, t) - y \\|^2,\\quad
        x_t = \\sqrt{\\bar\\alpha_t} x_0 + \\sqrt{1 - \\bar\\alpha_t}\\,\\epsilon

    with target y = eps, x0 or v = sqrt(abar) eps - sqrt(1 - abar) x0, and w_t from
    :func:`loss_weight`. With offset noise (Guttenberg 2023) the noise becomes
    ``noise + strength * offset_noise[:, None, ..., None, :]`` (one value per example and
    channel) and is both used to noise x0 and, for eps/v, in the target, as the reference does.

    Args:
      model_fn: ``model_fn(x_t, time, **model_kwargs)`` with time = ``c.model_times[t]``.
      c: coefficient table; x0: [B, ..., C] data in [-1, 1]; t: [B] int timesteps;
      noise: standard normal, shape of x0.
      objective: ``"eps"``, ``"x0"`` or ``"v"`` (aliases ``pred_noise``, ``pred_x0``,
        ``pred_v``).
      min_snr_gamma: gamma of min-SNR weighting (5 in the paper), or None.
      offset_noise: [B, C] standard normal draws; needed when offset_noise_strength > 0.

    Returns:
      [B] losses.
    """
    objective = gaussian.canonical_mean_type(objective)
    if objective == "prev_x":
        raise ValueError("simple_loss supports objectives eps, x0 and v; use training_losses")
    _check_image_inputs(x0, t, noise)
    if offset_noise_strength:
        want = (x0.shape[0], x0.shape[-1])
        if offset_noise is None or offset_noise.shape != want:
            got = None if offset_noise is None else offset_noise.shape
            raise ValueError(
                f"offset_noise_strength={offset_noise_strength} needs offset_noise of shape "
                f"[B, C] = {want}, got {got}"
            )
        offset = offset_noise.reshape((x0.shape[0],) + (1,) * (x0.ndim - 2) + (x0.shape[-1],))
        noise = noise + offset_noise_strength * offset
    x_t = gaussian.q_sample(c, x0, t, noise)
    out = model_fn(x_t, c.model_times[t], **(model_kwargs or {}))
    if out.shape != x0.shape:
        raise ValueError(f"model output has shape {out.shape}, expected the shape of x0 {x0.shape}")
    if objective == "eps":
        target = noise
    elif objective == "x0":
        target = x0
    else:
        target = gaussian.predict_v(c, x0, t, noise)
    mse = likelihood.mean_flat(jnp.square(out - target))
    return mse * loss_weight(c.snr, objective, min_snr_gamma)[t]


def training_losses(
    model_fn: Callable[..., jnp.ndarray],
    c: DiffusionCoeffs,
    x0: jnp.ndarray,
    t: jnp.ndarray,
    noise: jnp.ndarray,
    *,
    mean_type: str = "eps",
    var_type: str = "fixed_small",
    loss_type: str = "mse",
    vb_weight: float | None = None,
    log_floor: float = 1e-12,
    tails: str = "exact",
    model_kwargs: dict | None = None,
) -> dict[str, jnp.ndarray]:
    """improved-diffusion's training losses, per example.

    * ``kl``: the VB term L_t in bits/dim (:func:`jaxdiff.likelihood.vb_terms_bpd`, no clip);
      ``rescaled_kl`` multiplies it by T, an unbiased estimate of the whole bound.
    * ``mse`` / ``rescaled_mse``: ``mean_flat((target - output)^2)`` with target eps, x0, v or
      the posterior mean for mean types eps, x0, v, prev_x. With a learned variance the VB term
      is added (the hybrid loss, Nichol & Dhariwal 2021, Sec. 3.1) through a stop-gradient on
      the mean channels, so that it trains the variance only; its weight is T/1000 for
      ``rescaled_mse`` and 1 for ``mse`` unless ``vb_weight`` says otherwise.

    denoising-diffusion-pytorch's ``LearnedGaussianDiffusion`` loss is
    ``training_losses(..., mean_type="eps", var_type="learned_range", loss_type="mse",
    vb_weight=0.001, log_floor=1e-15)["loss"]`` on a table made with
    ``convention="lucidrains"``.

    ``tails="reference"`` evaluates the decoder likelihood with the references' float32 tail
    arithmetic (:func:`jaxdiff.likelihood.discretized_gaussian_log_likelihood`), which
    reproduces both references' float32 loss values at t = 0 where a model fits poorly; the
    default ``"exact"`` is more accurate there.

    Args:
      model_fn: ``model_fn(x_t, time, **model_kwargs)`` with time = ``c.model_times[t]``.
      c: coefficient table (T is its number of steps, respaced if it is respaced).
      x0: [B, ..., C] data on the 256-value grid; t: [B] timesteps; noise: shape of x0.
      mean_type, var_type: as :func:`jaxdiff.gaussian.p_mean_variance`.
      loss_type: one of ``mse``, ``rescaled_mse``, ``kl``, ``rescaled_kl``.
      vb_weight: override of the hybrid VB weight.
      log_floor: probability floor of the decoder likelihood.
      tails: ``"exact"`` (default) or ``"reference"``, the decoder's tail arithmetic.

    Returns:
      dict with ``loss`` [B], plus ``mse`` and ``vb`` where they exist.

    References: improved-diffusion ``GaussianDiffusion.training_losses``.
    """
    mean_type = gaussian.canonical_mean_type(mean_type)
    var_type = gaussian.canonical_var_type(var_type)
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss type {loss_type!r}; choose one of {list(LOSS_TYPES)}")
    likelihood.check_tails(tails)
    _check_image_inputs(x0, t, noise)
    num_steps = c.num_timesteps
    x_t = gaussian.q_sample(c, x0, t, noise)
    out = model_fn(x_t, c.model_times[t], **(model_kwargs or {}))
    mean_out, var_out = gaussian.split_model_output(out, x_t, var_type)

    def vb_of(output):
        vb, _ = likelihood.vb_terms_bpd(
            c,
            output,
            x0,
            x_t,
            t,
            mean_type=mean_type,
            var_type=var_type,
            clip_denoised=False,
            log_floor=log_floor,
            tails=tails,
        )
        return vb

    if loss_type in ("kl", "rescaled_kl"):
        vb = vb_of(out)
        return {"loss": vb * num_steps if loss_type == "rescaled_kl" else vb}

    terms: dict[str, jnp.ndarray] = {}
    if var_out is not None:
        frozen = jnp.concatenate([jax.lax.stop_gradient(mean_out), var_out], axis=-1)
        weight = vb_weight
        if weight is None:
            weight = num_steps / 1000.0 if loss_type == "rescaled_mse" else 1.0
        terms["vb"] = vb_of(frozen) * weight
    if mean_type == "eps":
        target = noise
    elif mean_type == "x0":
        target = x0
    elif mean_type == "v":
        target = gaussian.predict_v(c, x0, t, noise)
    else:
        target, _, _ = gaussian.q_posterior_mean_variance(c, x0, x_t, t)
    terms["mse"] = likelihood.mean_flat(jnp.square(target - mean_out))
    terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
    return terms


# --------------------------------------------------------------------------------------------
# Loss-second-moment timestep importance sampling (improved-diffusion resample.py), as a pure
# state pytree.
# --------------------------------------------------------------------------------------------


class LossSecondMomentState(NamedTuple):
    """History of recent per-timestep losses."""

    history: jnp.ndarray  # shape=(T, H), float32: last H losses of each timestep, oldest first
    counts: jnp.ndarray  # shape=(T,), int32: filled entries of each row (<= H)


def loss_second_moment_init(
    num_timesteps: int, history_per_term: int = 10
) -> LossSecondMomentState:
    """Empty history for T timesteps, H = ``history_per_term`` losses each."""
    if num_timesteps < 1 or history_per_term < 1:
        raise ValueError(
            f"need num_timesteps >= 1 and history_per_term >= 1, got {num_timesteps}, "
            f"{history_per_term}"
        )
    return LossSecondMomentState(
        history=jnp.zeros((num_timesteps, history_per_term), jnp.float32),
        counts=jnp.zeros((num_timesteps,), jnp.int32),
    )


def loss_second_moment_update(
    state: LossSecondMomentState, t: jnp.ndarray, losses: jnp.ndarray
) -> LossSecondMomentState:
    """Record the [B] total losses at timesteps t, in batch order (a FIFO of H per timestep).

    Gather ``t`` and ``losses`` from every device first (e.g. with ``jax.lax.all_gather``) to
    keep one history for the whole data-parallel run, as improved-diffusion does.
    """
    if t.shape != losses.shape or t.ndim != 1:
        raise ValueError(f"t and losses must both be [B], got {t.shape} and {losses.shape}")
    hist_len = state.history.shape[1]

    def record(s: LossSecondMomentState, item):
        ti, loss = item
        row, count = s.history[ti], s.counts[ti]
        full = count >= hist_len
        shifted = jnp.concatenate([row[1:], loss[None]])
        filled = row.at[jnp.minimum(count, hist_len - 1)].set(loss)
        new_row = jnp.where(full, shifted, filled)
        return LossSecondMomentState(
            s.history.at[ti].set(new_row), s.counts.at[ti].set(jnp.minimum(count + 1, hist_len))
        ), None

    items = (t.astype(jnp.int32), jax.lax.stop_gradient(losses).astype(jnp.float32))
    state, _ = jax.lax.scan(record, state, items)
    return state


def loss_second_moment_weights(
    state: LossSecondMomentState, uniform_prob: float = 0.001
) -> jnp.ndarray:
    """Sampling weights over timesteps, [T] (unnormalised, as improved-diffusion's ``weights``).

    All ones until every timestep has H recorded losses; then the probabilities
    :math:`w_t \\propto \\sqrt{\\mathrm{mean}(h_t^2)}`, mixed with ``uniform_prob`` of the
    uniform distribution (Nichol & Dhariwal 2021, Eq. 18). :func:`sample_timesteps`
    normalises.
    """
    num_steps, hist_len = state.history.shape
    warmed_up = jnp.all(state.counts == hist_len)
    second_moment = jnp.sqrt(jnp.mean(jnp.square(state.history), axis=-1))
    weights = second_moment / jnp.sum(second_moment)
    weights = weights * (1.0 - uniform_prob) + uniform_prob / num_steps
    return jnp.where(warmed_up, weights, jnp.ones((num_steps,), weights.dtype))


def sample_timesteps(
    key: jax.Array, weights: jnp.ndarray, batch_size: int
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Draw [B] timesteps with probability proportional to ``weights``.

    Returns ``(t, importance_weights)`` with importance weight ``1 / (T p_t)``, so that
    ``mean(loss * importance_weights)`` is an unbiased estimate of the uniform-t loss.
    """
    probs = weights / jnp.sum(weights)
    t = jax.random.choice(key, probs.shape[0], (batch_size,), p=probs)
    return t.astype(jnp.int32), 1.0 / (probs.shape[0] * probs[t])
