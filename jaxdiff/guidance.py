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
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = ["guided_model_fn", "guided_output"]


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
