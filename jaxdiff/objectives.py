"""Diffusion losses as a ``loss_fn(params, batch, key[, loss_state])`` for
:func:`jaxdiff.train.make_train_step`: a network's ``apply`` function and any loss of the core
(:func:`jaxdiff.losses.simple_loss`, :func:`jaxdiff.losses.training_losses`,
:func:`jaxdiff.continuous.continuous_loss`) made into one training objective.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxdiff import continuous, gaussian, likelihood, losses, schedules
from jaxdiff.gaussian import DiffusionCoeffs

__all__ = [
    "LOSSES",
    "diffusion_loss_fn",
    "initial_loss_state",
    "log_snr_fn_of",
    "loss_fn_from_config",
    "process_coeffs",
]

LOSSES: tuple[str, ...] = ("simple", "openai", "continuous")

LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


def _images(batch: Any) -> jax.Array:
    x = batch["image"] if isinstance(batch, Mapping) else batch
    if not hasattr(x, "dtype"):
        raise ValueError(f"a batch is an image array or a dict with 'image', got {type(x)}")
    if x.dtype == jnp.uint8:
        return x.astype(jnp.float32) / 127.5 - 1.0
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"images must be uint8 (0..255) or floating ([-1, 1]), got {x.dtype}")
    return x


def _floating_dtype(params: Any):
    for leaf in jax.tree.leaves(params):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            return leaf.dtype
    return jnp.float32


def diffusion_loss_fn(
    apply_fn: Callable[..., jax.Array],
    coeffs: DiffusionCoeffs | None = None,
    *,
    loss: str = "simple",
    objective: str = "eps",
    min_snr_gamma: float | None = None,
    offset_noise_strength: float = 0.0,
    self_condition: bool = False,
    mean_type: str = "eps",
    var_type: str = "fixed_small",
    loss_type: str = "mse",
    vb_weight: float | None = None,
    tails: str = "exact",
    log_snr_fn: Callable[[jax.Array], jax.Array] | None = None,
    cond_drop_prob: float = 0.0,
    train: bool = True,
) -> LossFn:
    """A ``loss_fn(params, batch, key[, loss_state])`` for :func:`make_train_step`.

    The batch is an image array [B, H, W, C] (or a dict with ``"image"``): uint8 is mapped to
    [-1, 1] by ``x / 127.5 - 1``; a floating batch is used as it is. From the key it draws,
    through ``fold_in``, t uniformly (from the importance sampler when a
    :class:`jaxdiff.losses.LossSecondMomentState` is passed as ``loss_state``), the noise,
    the dropout key and the offset noise, then returns the batch mean of

    * ``"simple"``: :func:`jaxdiff.losses.simple_loss` (denoising-diffusion-pytorch's
      ``p_losses``: ``objective``, ``min_snr_gamma``, ``offset_noise_strength``,
      ``self_condition``);
    * ``"openai"``: :func:`jaxdiff.losses.training_losses`["loss"] (improved-diffusion:
      ``mean_type``, ``var_type``, ``loss_type``, ``vb_weight``, ``tails``), its ``mse`` and
      ``vb`` terms as metrics (``tails="reference"`` reproduces improved-diffusion's float32
      decoder term; see :func:`jaxdiff.likelihood.discretized_gaussian_log_likelihood`);
    * ``"continuous"``: :func:`jaxdiff.continuous.continuous_loss` with times ~ U[0, 1)
      (``log_snr_fn``, ``objective``, ``min_snr_gamma``).

    With importance sampling the loss is ``mean(loss_b / (T p_{t_b}))`` and the per-example
    losses are recorded in the sampler's history (improved-diffusion's
    ``LossSecondMomentResampler``); the new history is ``aux["loss_state"]``.

    Each discrete loss also returns every term's mean per quarter of the timesteps
    (``loss_q0`` .. ``loss_q3``, and ``mse_q*``, ``vb_q*`` for improved-diffusion's loss).

    The network is called as ``apply_fn(params, x_t, time, **cond, [x_self_cond=...],
    train=True, rngs={"dropout": key})`` (jaxdiff's ``Unet``; ``train=False`` calls
    ``apply_fn(params, x_t, time, **cond)``, the form for a Flax NNX or any other JAX model),
    where ``cond`` is every entry of a dict batch other than ``"image"``, under its own name:
    a ``"label"`` [B] reaches the network as ``label=``, and so does anything a user adds.
    With ``cond_drop_prob`` p > 0 each label is replaced by -1, the null class, with
    probability p (label dropout, which classifier-free guidance needs; Ho & Salimans 2022).
    x_t is cast to the dtype of the params (bfloat16 under
    ``make_train_step(compute_dtype=...)``), time stays float32 (bfloat16 cannot hold the
    integers up to 1000), and the output is cast back to float32 for the loss.

    Self-conditioning (Chen et al. 2022, as ``p_losses``): with probability 1/2 per batch the
    network first predicts x0 without it, and that prediction, through a stop-gradient, is
    passed as ``x_self_cond``; otherwise ``x_self_cond`` is zeros (what the reference's U-Net
    uses when it is absent).
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {list(LOSSES)}")
    if loss in ("simple", "openai") and coeffs is None:
        raise ValueError(f"loss {loss!r} needs the coefficient table coeffs")
    if loss == "continuous" and log_snr_fn is None:
        raise ValueError("loss 'continuous' needs log_snr_fn, e.g. schedules.log_snr_schedule")
    if loss == "simple" and gaussian.canonical_mean_type(objective) == "prev_x":
        raise ValueError("loss 'simple' supports objectives eps, x0 and v; use loss='openai'")
    if loss == "openai":
        gaussian.canonical_mean_type(mean_type)
        gaussian.canonical_var_type(var_type)
        if loss_type not in losses.LOSS_TYPES:
            raise ValueError(
                f"unknown loss type {loss_type!r}; choose one of {list(losses.LOSS_TYPES)}"
            )
    if loss == "continuous" and objective not in continuous.OBJECTIVES:
        raise ValueError(
            f"unknown continuous-time objective {objective!r}; choose one of "
            f"{list(continuous.OBJECTIVES)}"
        )
    if self_condition and loss != "simple":
        raise ValueError(f"self_condition is supported with loss='simple', not {loss!r}")
    if offset_noise_strength and loss != "simple":
        raise ValueError(f"offset noise is supported with loss='simple', not {loss!r}")
    likelihood.check_tails(tails)
    if tails != "exact" and loss != "openai":
        raise ValueError(f"tails={tails!r} is supported with loss='openai', not {loss!r}")

    if not 0.0 <= cond_drop_prob <= 1.0:
        raise ValueError(f"cond_drop_prob must be in [0, 1], got {cond_drop_prob!r}")

    def loss_fn(params, batch, key, loss_state=None):
        x0 = _images(batch)
        size = x0.shape[0]
        t_key, noise_key, dropout_key, offset_key, cond_key, drop_key = (
            jax.random.fold_in(key, i) for i in range(6)
        )
        noise = jax.random.normal(noise_key, x0.shape, x0.dtype)
        cond = _conditioning(batch, size, cond_drop_prob, drop_key)

        def call(params, x, time, dropout_key, **kwargs):
            extra = {"train": True, "rngs": {"dropout": dropout_key}} if train else {}
            dtype = _floating_dtype(params)
            kwargs = {
                k: v.astype(dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v
                for k, v in {**cond, **kwargs}.items()
            }
            return apply_fn(params, x.astype(dtype), time, **kwargs, **extra).astype(x.dtype)

        if loss == "continuous":
            if loss_state is not None:
                raise ValueError("importance sampling of t needs a discrete loss")
            times = jax.random.uniform(t_key, (size,), jnp.float32)
            per_example = continuous.continuous_loss(
                lambda x, log_snr: call(params, x, log_snr, dropout_key),
                x0,
                times,
                noise,
                log_snr_fn=log_snr_fn,
                objective=objective,
                min_snr_gamma=min_snr_gamma,
            )
            return jnp.mean(per_example), {}

        if loss_state is None:
            t = jax.random.randint(t_key, (size,), 0, coeffs.num_timesteps, jnp.int32)
            weights = jnp.ones((size,), jnp.float32)
        else:
            t, weights = losses.sample_timesteps(
                t_key, losses.loss_second_moment_weights(loss_state), size
            )
        aux: dict[str, jax.Array] = {}

        if loss == "simple":
            model_fn = _self_conditioned(
                call, params, coeffs, objective, t, dropout_key, cond_key, self_condition
            )
            offset = None
            if offset_noise_strength:
                offset = jax.random.normal(offset_key, (size, x0.shape[-1]), x0.dtype)
            per_example = losses.simple_loss(
                model_fn,
                coeffs,
                x0,
                t,
                noise,
                objective=objective,
                min_snr_gamma=min_snr_gamma,
                offset_noise=offset,
                offset_noise_strength=offset_noise_strength,
            )
        else:
            terms = losses.training_losses(
                lambda x, time: call(params, x, time, dropout_key),
                coeffs,
                x0,
                t,
                noise,
                mean_type=mean_type,
                var_type=var_type,
                loss_type=loss_type,
                vb_weight=vb_weight,
                tails=tails,
            )
            per_example = terms["loss"]
            aux = {k: jnp.mean(v) for k, v in terms.items() if k != "loss"}
        if loss == "simple":
            terms = {"loss": per_example}
        aux.update(_quartiles(terms, t, coeffs.num_timesteps))

        if loss_state is not None:
            aux["loss_state"] = losses.loss_second_moment_update(loss_state, t, per_example)
        return jnp.mean(per_example * weights), aux

    return loss_fn


def _quartiles(terms: dict, t: jax.Array, num_timesteps: int) -> dict[str, jax.Array]:
    """Each term's batch mean per quarter of the timesteps, ``loss_q0`` .. ``loss_q3``
    (improved-diffusion's ``log_loss_dict``); NaN for a quarter the batch does not sample."""
    quarter = (t * 4) // num_timesteps
    out = {}
    for name, values in terms.items():
        for q in range(4):
            hit = (quarter == q).astype(values.dtype)
            count = jnp.sum(hit)
            total = jnp.sum(values * hit)
            out[f"{name}_q{q}"] = jnp.where(count > 0, total / jnp.maximum(count, 1), jnp.nan)
    return out


def _conditioning(batch, size: int, drop_prob: float, key) -> dict[str, jax.Array]:
    """The batch's entries besides the image, as the network's keyword arguments; labels
    dropped to -1 with probability ``drop_prob``."""
    if not isinstance(batch, Mapping):
        return {}
    cond = {k: jnp.asarray(v) for k, v in batch.items() if k != "image"}
    for name, value in cond.items():
        if value.shape[:1] != (size,):
            raise ValueError(
                f"batch[{name!r}] must have the batch size {size} as its first axis, got "
                f"shape {value.shape}"
            )
    if drop_prob and "label" in cond:
        drop = jax.random.bernoulli(key, drop_prob, (size,))
        cond["label"] = jnp.where(drop, -1, cond["label"]).astype(cond["label"].dtype)
    return cond


def _self_conditioned(call, params, coeffs, objective, t, dropout_key, cond_key, enabled):
    if not enabled:
        return lambda x, time: call(params, x, time, dropout_key)

    def model_fn(x, time):
        def with_prediction(_):
            first = call(params, x, time, jax.random.fold_in(dropout_key, 1), x_self_cond=x * 0)
            _, x0 = gaussian.model_predictions(coeffs, first, x, t, mean_type=objective)
            return jax.lax.stop_gradient(x0)

        coin = jax.random.bernoulli(cond_key)
        cond = jax.lax.cond(coin, with_prediction, lambda _: jnp.zeros_like(x), None)
        return call(params, x, time, dropout_key, x_self_cond=cond)

    return model_fn


# --------------------------------------------------------------------------------------------
# From a configuration (jaxdiff.config.DiffusionConfig and ModelConfig)
# --------------------------------------------------------------------------------------------


def process_coeffs(
    diffusion, convention: str | None = None, respacing: str | None = None
) -> DiffusionCoeffs:
    """The coefficient table of a :class:`jaxdiff.config.DiffusionConfig`'s discrete process.

    ``convention`` defaults to the loss's reference: ``"openai"`` for improved-diffusion's loss
    (the lower end of the learned-range variance is its log beta-tilde_1), ``"lucidrains"``
    otherwise. ``respacing`` (``"ddim50"``, ``"250"``) gives the respaced chain.
    """
    if convention is None:
        convention = "openai" if diffusion.loss == "openai" else "lucidrains"
    betas = schedules.get_named_beta_schedule(diffusion.schedule, diffusion.timesteps)
    return gaussian.make_coeffs(
        betas,
        convention=convention,
        respacing=respacing,
        rescale_timesteps=diffusion.rescale_timesteps,
    )


def log_snr_fn_of(diffusion) -> Callable[[jax.Array], jax.Array]:
    """The continuous-time log-SNR schedule of a ``DiffusionConfig``."""
    return schedules.log_snr_schedule(diffusion.log_snr_schedule, shift=diffusion.log_snr_shift)


def initial_loss_state(diffusion) -> losses.LossSecondMomentState | None:
    """The loss's own state at step 0: the importance sampler's history, or None."""
    if diffusion.timestep_sampler == "loss-second-moment":
        return losses.loss_second_moment_init(diffusion.timesteps)
    return None


def loss_fn_from_config(apply_fn: Callable[..., jax.Array], config) -> LossFn:
    """:func:`diffusion_loss_fn` for a :class:`jaxdiff.config.Config` (its ``diffusion`` and
    ``model`` sections): the loss, objective and variance, min-SNR, offset noise,
    self-conditioning, label dropout of a class-conditional model."""
    d, m = config.diffusion, config.model
    kwargs: dict[str, Any] = {"loss": d.loss}
    if d.loss == "continuous":
        kwargs.update(objective=d.objective, min_snr_gamma=d.min_snr_gamma)
        kwargs["log_snr_fn"] = log_snr_fn_of(d)
    elif d.loss == "simple":
        kwargs.update(
            objective=d.objective,
            min_snr_gamma=d.min_snr_gamma,
            offset_noise_strength=d.offset_noise_strength,
            self_condition=m.self_condition,
        )
    else:
        kwargs.update(
            mean_type=d.objective, var_type=d.var_type, loss_type=d.loss_type, vb_weight=d.vb_weight
        )
    coeffs = None if d.loss == "continuous" else process_coeffs(d)
    drop = m.cond_drop_prob if m.num_classes is not None else 0.0
    return diffusion_loss_fn(apply_fn, coeffs, cond_drop_prob=drop, **kwargs)
