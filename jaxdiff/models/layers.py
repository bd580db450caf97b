"""Layers shared by the denoising-diffusion-pytorch networks (the Unet and its class-conditional
variant), channels-last Flax linen.

* PyTorch's default initialisation (uniform in +-1/sqrt(fan_in) for kernels and biases), so a
  network trained from scratch starts from the reference's distribution;
* ``_dense`` / ``_conv``: Linear layers and 1x1 convolutions (both Flax ``Dense`` on NHWC), and
  stride-1 convolutions with the reference's symmetric zero padding;
* the reference's "RMSNorm" (an L2 normalisation over channels times ``g * sqrt(C)``), the
  sinusoidal and Fourier time embeddings, ``Block`` and ``ResnetBlock``;
* space-to-depth and nearest up-sampling;
* the compute-dtype rule of the networks' ``dtype`` option.

Reference: lucidrains/denoising-diffusion-pytorch 2.3.4 (``denoising_diffusion_pytorch.py``,
``classifier_free_guidance.py``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = [
    "Block",
    "FourierEmbedding",
    "RMSNorm",
    "ResnetBlock",
    "sinusoidal_embedding",
    "space_to_depth",
    "upsample_nearest",
]

_NORM_EPS = 1e-12  # F.normalize's floor on the L2 norm


# ----------------------------------------------------------------------------------------------
# Initialisers and layers


def _torch_kernel_init():
    """PyTorch's default Conv/Linear weight init, kaiming_uniform(a=sqrt(5)).

    That is U(-1/sqrt(fan_in), 1/sqrt(fan_in)): variance 1/(3 fan_in).
    """
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_bias_init(fan_in: int):
    """PyTorch's default Conv/Linear bias init: U(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _dense(features: int, fan_in: int, name: str, dtype: Any = None) -> nn.Dense:
    """A Linear layer, or a 1x1 convolution on channels-last input, computing in ``dtype``
    (the Unet passes its compute dtype; Flax casts the parameters to it)."""
    return nn.Dense(
        features,
        dtype=dtype,
        kernel_init=_torch_kernel_init(),
        bias_init=_torch_bias_init(fan_in),
        name=name,
    )


def _conv(features: int, size: int, fan_in_channels: int, name: str, dtype: Any = None) -> nn.Conv:
    """A stride-1 ``size x size`` convolution with the reference's symmetric zero padding."""
    pad = size // 2
    return nn.Conv(
        features,
        (size, size),
        dtype=dtype,
        padding=((pad, pad), (pad, pad)),
        kernel_init=_torch_kernel_init(),
        bias_init=_torch_bias_init(fan_in_channels * size * size),
        name=name,
    )


def _channels_last(v: jax.Array, ndim: int) -> jax.Array:
    """Reshape a per-channel vector [C] to [1, ..., 1, C] (explicit, for rank promotion 'raise')."""
    return v.reshape((1,) * (ndim - 1) + (v.shape[-1],))


class RMSNorm(nn.Module):
    """``x / max(||x||_2, 1e-12) * g * sqrt(C)``, the norm over the channel axis (last).

    The reference's ``RMSNorm``: an L2 normalisation (``F.normalize``) times a learned gain and
    sqrt(C); no mean is subtracted and there is no epsilon inside the square root. Computed in
    float32 whatever the dtype of the input and of the gain (bfloat16 params included), and
    returned in the input's dtype.
    """

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        g = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
        g = g.astype(jnp.float32)
        xf = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(jnp.square(xf), axis=-1, keepdims=True))
        y = xf / jnp.maximum(norm, _NORM_EPS) * _channels_last(g, x.ndim) * math.sqrt(channels)
        return y.astype(x.dtype)


def sinusoidal_embedding(time: jax.Array, dim: int, theta: float = 10000.0) -> jax.Array:
    """Sinusoidal time embedding of the reference (``SinusoidalPosEmb``), float32 [B, dim].

    .. math::
        f_j = \\exp(-j \\ln\\theta / (h - 1)),\\ j = 0..h-1,\\ h = dim / 2;\\quad
        e(t) = [\\sin(t f), \\cos(t f)]

    Note the ``h - 1`` denominator (most implementations use ``h``) and sin before cos.
    """
    half = dim // 2
    freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * (-math.log(theta) / (half - 1)))
    args = time.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class FourierEmbedding(nn.Module):
    """Random or learned Fourier features of t: ``[t, sin(2 pi t w), cos(2 pi t w)]``.

    ``w ~ N(0, 1)`` of size dim / 2 (Crowson's v-diffusion; VDM). With ``is_random`` the weights
    are fixed: they stay a parameter (the reference keeps them in its state_dict) but receive no
    gradient.
    """

    dim: int
    is_random: bool

    @nn.compact
    def __call__(self, time: jax.Array) -> jax.Array:
        w = self.param("weights", nn.initializers.normal(1.0), (self.dim // 2,), jnp.float32)
        w = w.astype(jnp.float32)  # float32 features whatever the params' dtype
        if self.is_random:
            w = jax.lax.stop_gradient(w)
        t = time.astype(jnp.float32)[:, None]
        # the reference's left-to-right order, ((t * w) * 2) * pi, for bitwise-equal arguments
        freqs = t * w[None, :] * 2.0 * math.pi
        return jnp.concatenate([t, jnp.sin(freqs), jnp.cos(freqs)], axis=-1)


class Block(nn.Module):
    """conv3x3 -> RMSNorm -> optional ``x * (scale + 1) + shift`` -> SiLU -> dropout."""

    features: int
    dropout: float = 0.0
    dtype: Any = None

    @nn.compact
    def __call__(self, x, scale_shift=None, *, train: bool = False):
        x = _conv(self.features, 3, x.shape[-1], "proj", self.dtype)(x)
        x = RMSNorm(name="norm")(x)
        if scale_shift is not None:
            scale, shift = scale_shift
            x = x * (scale + 1.0) + shift
        x = nn.silu(x)
        if self.dropout > 0.0:
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return x


class ResnetBlock(nn.Module):
    """Two Blocks, the first modulated by the time embedding, plus a (1x1-projected) shortcut.

    ``(scale, shift) = split(Dense(SiLU(t_emb)))``, scale first; dropout only in the first Block.
    ``train`` is positional so that :func:`flax.linen.remat` can treat it as static. The
    class-conditional network passes ``concat(time_emb, class_emb)`` as ``t_emb``: the
    reference's cfg ResnetBlock concatenates them before the same SiLU and Linear.
    """

    features: int
    dropout: float = 0.0
    dtype: Any = None

    @nn.compact
    def __call__(self, x, t_emb, train: bool = False):
        ss = _dense(2 * self.features, t_emb.shape[-1], "mlp", self.dtype)(nn.silu(t_emb))
        ss = ss[:, None, None, :]
        scale_shift = (ss[..., : self.features], ss[..., self.features :])
        h = Block(self.features, self.dropout, self.dtype, name="block1")(
            x, scale_shift, train=train
        )
        h = Block(self.features, dtype=self.dtype, name="block2")(h)
        if x.shape[-1] != self.features:
            x = _dense(self.features, x.shape[-1], "res_conv", self.dtype)(x)
        return h + x


def _resnet_block(remat: bool):
    """ResnetBlock, or its rematerialised version (activations recomputed in the backward
    pass instead of stored)."""
    return nn.remat(ResnetBlock, static_argnums=(3,)) if remat else ResnetBlock


def space_to_depth(x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, H/2, W/2, 4C] with channel index ``c * 4 + p1 * 2 + p2``.

    The reference's ``Rearrange('b c (h p1) (w p2) -> b (c p1 p2) h w')``, so a down-sampling
    kernel converts from PyTorch by transposition alone.
    """
    b, h, w, c = x.shape
    x = x.reshape(b, h // 2, 2, w // 2, 2, c)
    return jnp.transpose(x, (0, 1, 3, 5, 2, 4)).reshape(b, h // 2, w // 2, 4 * c)


def upsample_nearest(x: jax.Array) -> jax.Array:
    """Nearest-neighbour x2 up-sampling of [B, H, W, C]."""
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
    return x.reshape(b, 2 * h, 2 * w, c)


# ----------------------------------------------------------------------------------------------
# Configuration helpers


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _compute_dtype(dtype: Any) -> jnp.dtype:
    """The computation dtype with float32 parameters: ``dtype``, float32 when None; a
    ValueError for anything that is not a floating dtype."""
    if dtype is None:
        return jnp.dtype(jnp.float32)
    try:
        resolved = jnp.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved is None or not jnp.issubdtype(resolved, jnp.floating):
        raise ValueError(
            f"dtype must be None or a floating dtype such as 'bfloat16', got {dtype!r}"
        )
    return resolved


def _apply_dtype(dtype: Any, variables: Mapping) -> jnp.dtype:
    """``dtype`` when set; else the one floating dtype of the parameters being applied
    (float32 at init, when there are none, or when they mix dtypes)."""
    if dtype is not None:
        return _compute_dtype(dtype)
    dtypes = {
        leaf.dtype
        for leaf in jax.tree.leaves(variables.get("params", {}))
        if jnp.issubdtype(leaf.dtype, jnp.floating)
    }
    return dtypes.pop() if len(dtypes) == 1 else jnp.dtype(jnp.float32)
