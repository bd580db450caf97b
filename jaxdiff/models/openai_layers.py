"""The layers of openai's diffusion U-Nets (improved-diffusion, guided-diffusion), channels-last
Flax linen.

* ``GroupNorm32``: GroupNorm with 32 groups, eps 1e-5, always computed in float32 (the
  references' ``normalization``), returned in the input's dtype;
* ``timestep_embedding``: the references' sinusoidal embedding (cos first, then sin);
* ``ResBlock`` (optionally up- or down-sampling, FiLM-like scale-shift conditioning),
  ``AttentionBlock`` (both head layouts of the qkv projection), ``Downsample``, ``Upsample``,
  ``AttentionPool2d`` (the noisy classifier's CLIP-style pooling);
* ``EmbedSequential``: openai's ``TimestepEmbedSequential``, a list of those layers described by
  ``Layer`` records, whose children are named ``"0"``, ``"1"``, ... like the reference's;
* ``resize_bilinear``: PyTorch's ``F.interpolate(mode="bilinear", align_corners=False)`` (no
  antialiasing), for the super-resolution model's low-resolution input.

Every parameter is named after the reference's module path with ``.`` before an index written as
``_`` (``in_layers_2``, ``emb_layers_1``), so :mod:`jaxdiff.convert_openai` maps one to the other
mechanically. Initialisation follows the references: PyTorch's defaults, zeros for the layers
they wrap in ``zero_module``, ones / zeros for the norms.

Reference: openai/improved-diffusion 1bc7bbb and openai/guided-diffusion 22e0df8
(``unet.py``, ``nn.py``); Nichol & Dhariwal 2021, Dhariwal & Nichol 2021.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.models.layers import (
    _channels_last,
    _torch_bias_init,
    _torch_kernel_init,
    upsample_nearest,
)

__all__ = [
    "AttentionBlock",
    "AttentionPool2d",
    "BlockOptions",
    "Downsample",
    "EmbedSequential",
    "GroupNorm32",
    "Layer",
    "Plan",
    "ResBlock",
    "Upsample",
    "build_plan",
    "qkv_attention",
    "resize_bilinear",
    "timestep_embedding",
]

NUM_GROUPS = 32
GROUP_NORM_EPS = 1e-5  # torch.nn.GroupNorm's default
# Modules that are a 1-D 1x1 convolution in the references (weight [O, I, 1]); Flax Dense here.
CONV1D_MODULES = frozenset({"qkv", "proj_out", "qkv_proj", "c_proj"})


# ----------------------------------------------------------------------------------------------
# Primitives


def _conv(features, fan_in_channels, name, dtype, *, size=3, stride=1, zero=False) -> nn.Conv:
    """A ``size x size`` convolution with padding ``size // 2`` (the references' ``padding=1``
    for 3x3), PyTorch's default init, or zeros (``zero_module``)."""
    pad = size // 2
    return nn.Conv(
        features,
        (size, size),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        dtype=dtype,
        kernel_init=nn.initializers.zeros if zero else _torch_kernel_init(),
        bias_init=nn.initializers.zeros
        if zero
        else _torch_bias_init(fan_in_channels * size * size),
        name=name,
    )


def _dense(features, fan_in, name, dtype, *, zero=False) -> nn.Dense:
    """A Linear layer or a 1x1 (1-D) convolution on channels-last input."""
    return nn.Dense(
        features,
        dtype=dtype,
        kernel_init=nn.initializers.zeros if zero else _torch_kernel_init(),
        bias_init=nn.initializers.zeros if zero else _torch_bias_init(fan_in),
        name=name,
    )


class GroupNorm32(nn.Module):
    """GroupNorm over the last (channel) axis in 32 groups, float32 whatever the input dtype.

    .. math::
        y = (x - \\mu_g) / \\sqrt{\\sigma_g^2 + 10^{-5}} \\cdot \\gamma + \\beta

    with the mean and biased variance of each group over its channels and every non-batch,
    non-channel axis (two passes: no ``E[x^2] - E[x]^2`` cancellation). The references'
    ``GroupNorm32`` casts to float32 the same way, also in their float16 mode.
    """

    num_groups: int = NUM_GROUPS
    epsilon: float = GROUP_NORM_EPS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        xf = x.astype(jnp.float32)
        g = xf.reshape(*x.shape[:-1], self.num_groups, c // self.num_groups)
        axes = (*range(1, g.ndim - 2), g.ndim - 1)
        mean = jnp.mean(g, axis=axes, keepdims=True)
        centred = g - mean
        var = jnp.mean(jnp.square(centred), axis=axes, keepdims=True)
        y = (centred * jax.lax.rsqrt(var + self.epsilon)).reshape(xf.shape)
        y = y * _channels_last(scale.astype(jnp.float32), y.ndim)
        y = y + _channels_last(bias.astype(jnp.float32), y.ndim)
        return y.astype(x.dtype)


def timestep_embedding(timesteps: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """The references' sinusoidal timestep embedding, float32 [B, dim].

    .. math::
        f_i = \\exp(-\\ln(P) \\, i / h),\\ i = 0..h-1,\\ h = \\lfloor dim / 2 \\rfloor;\\quad
        e(t) = [\\cos(t f), \\sin(t f)]

    cos first, the ``h`` denominator (not ``h - 1``), and a zero column appended for odd ``dim``.
    The frequencies are computed in float32 in the reference's order (multiply, then divide).
    """
    half = dim // 2
    freqs = jnp.arange(half, dtype=jnp.float32) * np.float32(-math.log(max_period))
    freqs = jnp.exp(freqs / np.float32(half))
    args = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
    embedding = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        embedding = jnp.concatenate([embedding, jnp.zeros_like(embedding[:, :1])], axis=-1)
    return embedding


def qkv_attention(qkv: jax.Array, heads: int, new_order: bool) -> jax.Array:
    """Multi-head softmax attention from a fused projection qkv [B, T, 3 * heads * ch].

    ``new_order`` (guided's ``QKVAttention``): the channels are [q | k | v], each split into
    heads. Otherwise (``QKVAttentionLegacy``, and improved-diffusion's only layout): they are
    split into heads first, each head holding [q | k | v]. q and k are each scaled by
    ``ch ** -1/4`` before their product (the references' float16-friendly form of
    ``1 / sqrt(ch)``); the softmax runs in float32. Returns [B, T, heads * ch], head-major.
    """
    b, t, width = qkv.shape
    ch = width // (3 * heads)
    if new_order:
        parts = qkv.reshape(b, t, 3, heads, ch)
        q, k, v = parts[:, :, 0], parts[:, :, 1], parts[:, :, 2]
    else:
        parts = qkv.reshape(b, t, heads, 3, ch)
        q, k, v = parts[..., 0, :], parts[..., 1, :], parts[..., 2, :]
    scale = 1.0 / math.sqrt(math.sqrt(ch))
    weight = jnp.einsum("bthc,bshc->bhts", q * scale, k * scale)
    weight = jax.nn.softmax(weight.astype(jnp.float32), axis=-1).astype(qkv.dtype)
    return jnp.einsum("bhts,bshc->bthc", weight, v).reshape(b, t, heads * ch)


def _bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] float32 weights of PyTorch's 1-D linear interpolation, align_corners=False:
    source ``max((o + 0.5) * in / out - 0.5, 0)`` between its floor and the next pixel (the
    last pixel repeats), computed in float32 like the reference's CPU kernel."""
    scale = np.float32(in_size) / np.float32(out_size)
    matrix = np.zeros((out_size, in_size), np.float32)
    for o in range(out_size):
        src = max(scale * (np.float32(o) + np.float32(0.5)) - np.float32(0.5), np.float32(0))
        i0 = int(src)
        i1 = i0 + (1 if i0 < in_size - 1 else 0)
        w1 = np.float32(src - np.float32(i0))
        matrix[o, i0] += np.float32(1) - w1
        matrix[o, i1] += w1
    return matrix


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """[B, h, w, C] -> [B, H, W, C] as ``F.interpolate(x, size, mode="bilinear")`` (PyTorch's
    default ``align_corners=False``, no antialiasing when shrinking)."""
    rows = jnp.asarray(_bilinear_matrix(x.shape[1], size[0]), x.dtype)
    cols = jnp.asarray(_bilinear_matrix(x.shape[2], size[1]), x.dtype)
    x = jnp.einsum("oh,bhwc->bowc", rows, x)
    return jnp.einsum("pw,bowc->bopc", cols, x)


def avg_pool2(x: jax.Array) -> jax.Array:
    """2x2 average pooling, stride 2, of [B, H, W, C]."""
    b, h, w, c = x.shape
    return jnp.mean(x.reshape(b, h // 2, 2, w // 2, 2, c), axis=(2, 4))


# ----------------------------------------------------------------------------------------------
# Blocks


class BlockOptions(NamedTuple):
    """What every block of one network shares."""

    dropout: float
    use_scale_shift_norm: bool
    conv_resample: bool
    use_new_attention_order: bool
    dtype: Any  # the torso's compute dtype
    # recompute the ResBlocks' and attention blocks' activations in the backward pass
    # (flax.linen.remat; the references' use_checkpoint): less memory, more compute
    remat: bool = False


class Downsample(nn.Module):
    """Stride-2 3x3 convolution ``op`` (``conv_resample``) or 2x2 average pooling."""

    use_conv: bool
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        if self.use_conv:
            return _conv(c, c, "op", self.dtype, stride=2)(x)
        return avg_pool2(x)


class Upsample(nn.Module):
    """Nearest x2 up-sampling, then a 3x3 convolution ``conv`` (``conv_resample``)."""

    use_conv: bool
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        x = upsample_nearest(x)
        if self.use_conv:
            c = x.shape[-1]
            x = _conv(c, c, "conv", self.dtype)(x)
        return x


class ResBlock(nn.Module):
    """openai's ``ResBlock``: GroupNorm, SiLU, conv; add the time embedding (or scale-shift the
    second norm, ``h = norm(h) (1 + scale) + shift``, scale first); SiLU, dropout, a
    zero-initialised conv; plus the (1x1-projected) input.

    With ``up`` / ``down`` (``resblock_updown``) both the normalised input and the shortcut are
    resampled (nearest up / 2x2 average down) before the first conv. The embedding's Linear runs
    in float32 (the references' float16 mode leaves Linear layers in float32) and its output is
    cast to the compute dtype.
    """

    out_channels: int
    options: BlockOptions
    up: bool = False
    down: bool = False

    @nn.compact
    def __call__(self, x, emb, train: bool = False):
        o, dtype, c = self.options, self.options.dtype, x.shape[-1]
        out = self.out_channels
        h = nn.silu(GroupNorm32(name="in_layers_0")(x))
        if self.up:
            h, x = upsample_nearest(h), upsample_nearest(x)
        elif self.down:
            h, x = avg_pool2(h), avg_pool2(x)
        h = _conv(out, c, "in_layers_2", dtype)(h)
        emb_width = 2 * out if o.use_scale_shift_norm else out
        emb_out = _dense(emb_width, emb.shape[-1], "emb_layers_1", jnp.float32)(nn.silu(emb))
        emb_out = emb_out.astype(h.dtype)[:, None, None, :]
        norm = GroupNorm32(name="out_layers_0")
        if o.use_scale_shift_norm:
            scale, shift = emb_out[..., :out], emb_out[..., out:]
            h = norm(h) * (1 + scale) + shift
        else:
            h = norm(h + emb_out)
        h = nn.silu(h)
        if o.dropout > 0.0:
            h = nn.Dropout(o.dropout, deterministic=not train)(h)
        h = _conv(out, out, "out_layers_3", dtype, zero=True)(h)
        if out != c:
            x = _conv(out, c, "skip_connection", dtype, size=1)(x)
        return x + h


class AttentionBlock(nn.Module):
    """Self-attention over all pixels: GroupNorm, a fused qkv projection, ``qkv_attention``
    (``heads`` heads in the options' qkv layout), a zero-initialised projection, plus x."""

    heads: int
    options: BlockOptions

    @nn.compact
    def __call__(self, x):
        b, hh, ww, c = x.shape
        dtype = self.options.dtype
        h = GroupNorm32(name="norm")(x.reshape(b, hh * ww, c))
        qkv = _dense(3 * c, c, "qkv", dtype)(h)
        h = qkv_attention(qkv, self.heads, self.options.use_new_attention_order)
        h = _dense(c, c, "proj_out", dtype, zero=True)(h)
        return x + h.reshape(b, hh, ww, c)


class AttentionPool2d(nn.Module):
    """guided-diffusion's ``AttentionPool2d`` (from CLIP): prepend the mean pixel, add a learned
    positional embedding ``[C, HW + 1]`` (kept in the reference's layout), attend with
    ``embed_dim // num_head_channels`` heads (the [q | k | v] layout), project, and return the
    first token [B, output_dim]."""

    spacial_dim: int
    num_head_channels: int
    output_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, hh, ww, c = x.shape
        tokens = self.spacial_dim**2 + 1
        pos = self.param(
            "positional_embedding",
            lambda key, shape: jax.random.normal(key, shape, jnp.float32) / math.sqrt(c),
            (c, tokens),
        )
        x = x.reshape(b, hh * ww, c)
        x = jnp.concatenate([jnp.mean(x, axis=1, keepdims=True), x], axis=1)
        x = x + jnp.transpose(pos).astype(x.dtype)[None]
        qkv = _dense(3 * c, c, "qkv_proj", self.dtype)(x)
        h = qkv_attention(qkv, c // self.num_head_channels, new_order=True)
        return _dense(self.output_dim, c, "c_proj", self.dtype)(h[:, 0])


class Layer(NamedTuple):
    """One layer of an ``EmbedSequential``: ``kind`` is "conv" (the input 3x3 convolution),
    "res" (a ResBlock to ``channels``, up/down with ``updown`` = "up" / "down"), "attn" (an
    AttentionBlock of ``heads`` heads), "down" or "up"."""

    kind: str
    channels: int = 0
    heads: int = 0
    updown: str = ""


class EmbedSequential(nn.Module):
    """openai's ``TimestepEmbedSequential``: the layers in order, the ResBlocks given the
    embedding; the children are named by position ("0", "1", ...) like the reference's."""

    layers: tuple[Layer, ...]
    options: BlockOptions

    @nn.compact
    def __call__(self, x, emb, train: bool = False):
        o = self.options
        # remat's arguments count the module: (x, emb, train) are 1, 2, 3; train is static
        res_cls = nn.remat(ResBlock, static_argnums=(3,)) if o.remat else ResBlock
        attn_cls = nn.remat(AttentionBlock) if o.remat else AttentionBlock
        for i, layer in enumerate(self.layers):
            name = str(i)
            if layer.kind == "conv":
                x = _conv(layer.channels, x.shape[-1], name, o.dtype)(x)
            elif layer.kind == "res":
                up, down = layer.updown == "up", layer.updown == "down"
                block = res_cls(layer.channels, o, up=up, down=down, name=name)
                x = block(x, emb, train)
            elif layer.kind == "attn":
                x = attn_cls(layer.heads, o, name=name)(x)
            elif layer.kind == "down":
                x = Downsample(o.conv_resample, o.dtype, name=name)(x)
            elif layer.kind == "up":
                x = Upsample(o.conv_resample, o.dtype, name=name)(x)
            else:
                raise ValueError(f"unknown layer kind {layer.kind!r}")
        return x


# ----------------------------------------------------------------------------------------------
# The layer lists of a network


class Plan(NamedTuple):
    """The layer lists of one network, from its options (pure Python, static)."""

    input_blocks: tuple[tuple[Layer, ...], ...]
    middle_block: tuple[Layer, ...]
    output_blocks: tuple[tuple[Layer, ...], ...]  # empty for the encoder
    skip_channels: tuple[int, ...]  # each input block's output width
    bottom_channels: int  # the middle block's width
    downsample_factor: int  # 2 ** (levels - 1)


def _width(mult, model_channels: int) -> int:
    """A level's width, ``int(mult * model_channels)`` as in guided-diffusion."""
    return int(mult * model_channels)


def build_plan(
    model_channels: int,
    channel_mult: tuple,
    num_res_blocks: int,
    attention_resolutions: tuple[int, ...],
    heads: Callable[[int, bool], int],
    resblock_updown: bool,
    with_output: bool,
) -> Plan:
    """The references' block lists: per level ``num_res_blocks`` ResBlocks (with attention where
    the level's down-sampling rate is in ``attention_resolutions``) and a down-sampling between
    levels; the middle block; with ``with_output`` the way up (one more ResBlock per level, the
    up-sampling after its last). ``heads(channels, upsample)`` gives an attention layer's heads.
    """
    mc, last = model_channels, len(channel_mult) - 1
    ch = _width(channel_mult[0], mc)
    blocks, skips, ds = [(Layer("conv", ch),)], [ch], 1
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            ch = _width(mult, mc)
            layers = [Layer("res", ch)]
            if ds in attention_resolutions:
                layers.append(Layer("attn", heads=heads(ch, False)))
            blocks.append(tuple(layers))
            skips.append(ch)
        if level != last:
            blocks.append((Layer("res", ch, updown="down") if resblock_updown else Layer("down"),))
            skips.append(ch)
            ds *= 2
    middle = (Layer("res", ch), Layer("attn", heads=heads(ch, False)), Layer("res", ch))
    bottom, factor, out = ch, ds, []
    for level, mult in reversed(list(enumerate(channel_mult)) if with_output else []):
        for i in range(num_res_blocks + 1):
            ch = _width(mult, mc)
            layers = [Layer("res", ch)]
            if ds in attention_resolutions:
                layers.append(Layer("attn", heads=heads(ch, True)))
            if level and i == num_res_blocks:
                layers.append(Layer("res", ch, updown="up") if resblock_updown else Layer("up"))
                ds //= 2
            out.append(tuple(layers))
    return Plan(tuple(blocks), middle, tuple(out), tuple(skips), bottom, factor)
