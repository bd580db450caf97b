"""Classifier-free guidance of two network outputs, as denoising-diffusion-pytorch 2.3.4's
``classifier_free_guidance.Unet.forward_with_cond_scale`` computes it.

``guided_output`` is a pure function of arrays (jax only, no network): the conditional output
(``label=y``) and the unconditional one (``label=-1``, the null class of
:class:`jaxdiff.models.ClassConditionalUnet`) in, the guided output out. ``guided_model_fn``
wraps any ``model_fn(x, time, **cond)`` with it, for every sampler of :mod:`jaxdiff.samplers`
(both halves in one batched call if asked).

Reference: Ho & Salimans 2022, "Classifier-Free Diffusion Guidance"; Lin et al. 2024, "Common
Diffusion Noise Schedules and Sample Steps are Flawed" (the rescale, Sec. 3.4); Sadat et al.
2024, "Eliminating Oversaturation and Artifacts of High Guidance Scales in Diffusion Models"
(the parallel-component removal); lucidrains/denoising-diffusion-pytorch 2.3.4.

``classifier_cond_fn`` is classifier guidance (Dhariwal & Nichol 2021, "Diffusion Models Beat
GANs on Image Synthesis", Alg. 1 and 2): from a noisy classifier's logits it builds the
``cond_fn(x, time, y=...)`` = s grad_x log p(y | x_t) that the samplers take, as
guided-diffusion's ``scripts/classifier_sample.py`` does.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = ["classifier_cond_fn", "guided_model_fn", "guided_output"]


def guided_output(
    cond_out: jax.Array,
    uncond_out: jax.Array,
    scale: float | jax.Array,
    rescaled_phi: float | jax.Array = 0.0,
    *,
    remove_parallel_component: bool = True,
    keep_parallel_frac: float | jax.Array = 0.0,
) -> jax.Array:
    """Classifier-free guidance of two network outputs, the reference's
    ``forward_with_cond_scale`` (denoising-diffusion-pytorch 2.3.4).

    With ``c`` the conditional and ``u`` the unconditional output [B, ...], per example:

    .. math::
        \\Delta = c - u;\\quad
        \\Delta_\\parallel = (\\Delta \\cdot \\hat c)\\, \\hat c,\\
        \\hat c = c / \\max(\\|c\\|_2, 10^{-12});\\quad
        \\Delta \\leftarrow (\\Delta - \\Delta_\\parallel) + f\\, \\Delta_\\parallel
        \\ \\text{(with remove\\_parallel\\_component)}

        g = c + (s - 1) \\Delta;\\quad
        \\mathrm{out} = \\phi\\, g\\, \\frac{\\mathrm{std}(c)}{\\mathrm{std}(g)} + (1 - \\phi)\\, g

    where the dot product and the norm run over all non-batch elements, ``std`` is the
    unbiased (n - 1) standard deviation over them (the correction cancels in the ratio),
    ``s = scale``, ``f = keep_parallel_frac`` and
    ``phi = rescaled_phi``. ``scale == 1`` returns ``c`` exactly and ``rescaled_phi == 0``
    returns ``g`` exactly, as the reference's early returns do (selected with ``jnp.where``, so
    both may be traced). Without ``remove_parallel_component`` it is the classic
    ``u + s (c - u)`` (Ho & Salimans 2022, Eq. 6) up to rounding. The reference computes the
    projection in float64; here it runs in the inputs' precision (float32 at least).

    The layout does not matter (the sums and standard deviations run over every non-batch
    element), so channels-last outputs work as they are.

    Args:
      cond_out: [B, ...] the output with the labels (``label``).
      uncond_out: [B, ...] the output with no class (``label = -1``).
      scale: the guidance scale (the reference's ``cond_scale``; 1 is no guidance).
      rescaled_phi: how much of the std-rescaled output to mix in (Lin et al. 2024, Sec. 3.4).
      remove_parallel_component: drop the part of the update parallel to ``cond_out`` (the
        reference's default, True; Sadat et al. 2024).
      keep_parallel_frac: the fraction of that parallel part kept (the reference's default 0).

    Returns:
      The guided output, shape and dtype of ``cond_out``. (The reference also returns the
      unconditional output, which the caller already has.)
    """
    cond_out, uncond_out = jnp.asarray(cond_out), jnp.asarray(uncond_out)
    if cond_out.shape != uncond_out.shape:
        raise ValueError(
            f"cond_out and uncond_out must have one shape, got {cond_out.shape} and "
            f"{uncond_out.shape}"
        )
    if cond_out.ndim < 2:
        raise ValueError(f"outputs must be [B, ...] with B first, got shape {cond_out.shape}")
    if not isinstance(remove_parallel_component, bool):
        raise ValueError(
            f"remove_parallel_component must be a bool, got {remove_parallel_component!r}"
        )
    work = jnp.result_type(cond_out.dtype, uncond_out.dtype, jnp.float32)
    c, u = cond_out.astype(work), uncond_out.astype(work)
    scale = jnp.asarray(scale, work)
    rescaled_phi = jnp.asarray(rescaled_phi, work)
    update = c - u
    if remove_parallel_component:
        flat_c = c.reshape(c.shape[0], -1)
        flat_update = update.reshape(update.shape[0], -1)
        norm = jnp.sqrt(jnp.sum(jnp.square(flat_c), axis=-1, keepdims=True))
        unit = flat_c / jnp.maximum(norm, 1e-12)
        parallel = jnp.sum(flat_update * unit, axis=-1, keepdims=True) * unit
        orthogonal = flat_update - parallel
        update = (orthogonal + parallel * keep_parallel_frac).reshape(update.shape)
    guided = c + update * (scale - 1.0)
    axes = tuple(range(1, c.ndim))
    ratio = jnp.std(c, axis=axes, keepdims=True, ddof=1) / jnp.std(
        guided, axis=axes, keepdims=True, ddof=1
    )
    rescaled = guided * ratio
    mixed = rescaled * rescaled_phi + guided * (1.0 - rescaled_phi)
    out = jnp.where(rescaled_phi == 0.0, guided, mixed)
    out = jnp.where(scale == 1.0, c, out)
    return out.astype(cond_out.dtype)


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
        guided = guided_output(
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


def _label_range(y) -> tuple[int, int] | None:
    """(min, max) of concrete labels (read on the host, so that nothing is staged into a trace
    the call sits in, such as a sampler's scan); None for traced or empty labels."""
    if isinstance(y, jax.core.Tracer):
        return None
    host = jax.device_get(y)
    try:
        values = host.ravel().tolist() if hasattr(host, "ravel") else list(host)
        return (int(min(values)), int(max(values))) if values else None
    except (TypeError, ValueError):  # not a label array: the shape check names it
        return None


def classifier_cond_fn(
    logits_fn: Callable[[jax.Array, jax.Array], jax.Array], scale: float | jax.Array = 1.0
) -> Callable[..., jax.Array]:
    r"""Classifier guidance: the gradient of a noisy classifier's log-probability of the labels.

    .. math::
        \mathrm{cond\_fn}(x, t, y) = s\, \nabla_x \sum_b
        \log \operatorname{softmax}\big(f(x, t)\big)_{b,\, y_b}
        = s\, \nabla_{x} \log p_\phi(y \mid x_t)

    with ``f = logits_fn`` and ``s = scale``. Each example's log-probability depends on its own
    image only, so the gradient of the batch sum is the per-example gradient. The samplers use
    it as Dhariwal & Nichol 2021 do: DDPM shifts the mean by variance * cond_fn (Alg. 1,
    guided-diffusion ``condition_mean``), DDIM moves eps by -sigma * cond_fn (Alg. 2,
    ``condition_score``). It is the ``cond_fn`` of guided-diffusion's
    ``scripts/classifier_sample.py`` (``classifier_scale`` is ``scale``).

    Args:
      logits_fn: ``logits_fn(x, time) -> [B, K]`` class logits of the noisy image ``x``
        ([B, ...], the sampler's x_t) at the network time input ``time`` ([B]), e.g.
        ``lambda x, t: classifier.apply(variables, x, t)`` with
        :class:`jaxdiff.models.openai_unet.EncoderUNetModel`. The samplers' denoiser passes it
        the same time the diffusion network gets (a respaced table's ``model_times``, as
        guided-diffusion's ``_WrappedModel`` maps it for both).
      scale: the guidance scale ``s`` (may be traced; 0 gives zeros).

    Returns:
      ``cond_fn(x, time, y=None, **unused)``, for ``cond_fn=`` of :func:`jaxdiff.samplers.
      make_denoiser`, ``ddpm_sample`` and ``ddim_sample``: it gets the sampler's
      ``model_kwargs`` (other keys are ignored) and returns an array of x's shape and dtype.
      ``y`` ([B] integer labels) is required: a missing ``y``, a batch size other than x's or
      (where the labels are concrete) a label outside [0, K) raises a ValueError.

    References: Dhariwal & Nichol 2021, Sec. 4 and Alg. 1, 2; guided-diffusion 22e0df8,
    ``scripts/classifier_sample.py`` and ``gaussian_diffusion.condition_mean`` /
    ``condition_score``.
    """
    if not callable(logits_fn):
        raise ValueError(f"logits_fn must be callable, got {type(logits_fn).__name__}")

    def cond_fn(x, time, y=None, **_):
        if y is None:
            raise ValueError(
                "classifier guidance needs the labels: pass model_kwargs={'y': labels} to the "
                "sampler (cond_fn is called as cond_fn(x, time, **model_kwargs))"
            )
        x = jnp.asarray(x)
        bounds = _label_range(y)
        y = jnp.asarray(y)
        if y.ndim != 1 or y.shape[0] != x.shape[0] or not jnp.issubdtype(y.dtype, jnp.integer):
            raise ValueError(
                f"y must be [B] integer labels with B = {x.shape[0]} (x's batch), got shape "
                f"{tuple(y.shape)} and dtype {y.dtype}"
            )

        def total_log_prob(x_in):
            logits = jnp.asarray(logits_fn(x_in, time))
            if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
                raise ValueError(
                    f"logits_fn must return [B, K] logits with B = {x.shape[0]}, got shape "
                    f"{tuple(logits.shape)}"
                )
            if bounds is not None and (bounds[0] < 0 or bounds[1] >= logits.shape[1]):
                raise ValueError(
                    f"y values must be in [0, {logits.shape[1]}) (the classifier's classes), "
                    f"got labels from {bounds[0]} to {bounds[1]}"
                )
            work = jnp.promote_types(logits.dtype, jnp.float32)
            log_probs = jax.nn.log_softmax(logits.astype(work), axis=-1)
            return jnp.sum(jnp.take_along_axis(log_probs, y[:, None], axis=-1))

        grad = jax.grad(total_log_prob)(x)
        return (grad * jnp.asarray(scale, grad.dtype)).astype(x.dtype)

    return cond_fn
