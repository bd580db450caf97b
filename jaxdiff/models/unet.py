"""The denoising-diffusion-pytorch U-Net in Flax linen, channels-last.

Same architecture, options and numerics as ``denoising_diffusion_pytorch.Unet`` (version 2.3.4),
so that its weights, imported with :mod:`jaxdiff.convert`, give the same outputs (checked to
float32 round-off by ``tests/parity/test_unet_parity.py``). What it computes:

* time embedding: sinusoidal (``SinusoidalPosEmb``, with the ``half - 1`` denominator, sin
  first) or random / learned Fourier features (``[t, sin(2 pi t w), cos(2 pi t w)]``), then
  ``Dense -> GELU (exact erf) -> Dense`` to ``4 * dim``;
* a 7x7 input convolution, then per resolution two ResNet blocks, an attention layer (linear
  attention, or full attention where ``full_attn`` says so) and a down-sampling by
  space-to-depth (channel index ``c * 4 + p1 * 2 + p2``) and a 1x1 convolution; the last stage
  keeps its resolution and uses a 3x3 convolution;
* a middle ResNet block, full attention, ResNet block;
* the mirror image going up, each ResNet block fed ``concat(x, skip)`` (x first), nearest
  up-sampling and a 3x3 convolution; ``concat(x, init_conv(x))``, a last ResNet block and a 1x1
  convolution to ``out_dim`` channels.

The norm is the reference's "RMSNorm": ``x / max(||x||_2, 1e-12) * g * sqrt(C)`` over channels.
Every attention layer has ``num_mem_kv`` learned memory key/value slots prepended to the
sequence. The reference's ``flash_attn`` only picks a PyTorch kernel for the same softmax
attention, so it is accepted and changes nothing here.

Weights are initialised with PyTorch's defaults (uniform in +-1/sqrt(fan_in) for kernels and
biases, N(0, 1) for memory slots and Fourier weights, ones for norm gains), so a network trained
from scratch starts from the same distribution as the reference.

Reference: Ho et al. 2020 (the U-Net of DDPM, Appendix B); lucidrains/denoising-diffusion-pytorch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["PRESETS", "StageSpec", "Unet", "sinusoidal_embedding", "unet_from_config"]

# The reference's option names, in its constructor's order, plus jaxdiff's ``num_mem_kv`` (the
# reference hard-codes 4 memory key/value slots per attention layer).
CONFIG_FIELDS = (
    "dim",
    "init_dim",
    "out_dim",
    "dim_mults",
    "channels",
    "self_condition",
    "learned_variance",
    "learned_sinusoidal_cond",
    "random_fourier_features",
    "learned_sinusoidal_dim",
    "sinusoidal_pos_emb_theta",
    "dropout",
    "attn_dim_head",
    "attn_heads",
    "full_attn",
    "flash_attn",
    "num_mem_kv",
)

# Named configurations for ``unet_from_config`` and ``jaxdiff convert --config NAME``.
PRESETS: dict[str, dict[str, Any]] = {
    # The reference README's example network.
    "lucid-readme": {"dim": 64, "dim_mults": (1, 2, 4, 8), "flash_attn": True},
    # The CPU configuration of experiments/bench.py (``--config small``).
    "cifar-small": {"dim": 32, "dim_mults": (1, 2, 2)},
    # A tiny network for tests and smoke runs.
    "tiny": {"dim": 8, "dim_mults": (1, 2), "attn_heads": 2, "attn_dim_head": 4},
}

_NORM_EPS = 1e-12  # F.normalize's floor on the L2 norm


class StageSpec(NamedTuple):
    """One resolution of the down path (the up path visits them in reverse)."""

    dim_in: int  # channels entering the stage (and of its ResNet blocks and attention)
    dim_out: int  # channels after its down-sampling convolution
    full_attn: bool  # full softmax attention (True) or linear attention (False)
    heads: int
    dim_head: int


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
    ``train`` is positional so that :func:`flax.linen.remat` can treat it as static.
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


class _Params(nn.Module):
    """A layer's parameters without its computation: ``(kernel [fan_in, features], bias)``.

    Named and initialised like the ``nn.Dense`` it stands for (bias only with ``use_bias``), so
    checkpoints and :mod:`jaxdiff.convert` see the same tree; the attention layers below apply
    the kernels in per-head pieces.
    """

    fan_in: int
    features: int
    use_bias: bool = True

    @nn.compact
    def __call__(self):
        kernel = self.param(
            "kernel", _torch_kernel_init(), (self.fan_in, self.features), jnp.float32
        )
        if not self.use_bias:
            return kernel, None
        return kernel, self.param("bias", _torch_bias_init(self.fan_in), (self.features,))


class _AttentionBase(nn.Module):
    """Shared parts of the two attention layers, computed head by head.

    XLA on CPU turns every [B, N, heads, d] <-> [B, heads, N, d] transposition, and the
    gradient of every slice of a wide projection, into a copy of the whole activation; at 32x32
    those copies cost more than the attention's arithmetic. So every head gets its own
    [B, N, d] projections from a column block of the (unchanged) ``to_qkv`` kernel, and each
    per-head product is a plain batched matmul. ``cifar-small``, batch 16, forward + backward
    on 2 CPU cores: 505 -> 470 ms; the attention layers alone now run faster than PyTorch's
    (see BENCHMARKS.md).
    """

    heads: int
    dim_head: int
    num_mem_kv: int
    dtype: Any = None

    def _setup(self, x):
        """Pre-norm; return the normalised [B, N, C] input, the to_qkv kernel and the memory
        key/values [2, heads, M, d]."""
        b, hh, ww, c = x.shape
        x = RMSNorm(name="norm")(x).reshape(b, hh * ww, c)
        kernel, _ = _Params(c, 3 * self.heads * self.dim_head, False, name="to_qkv")()
        mem = self.param(
            "mem_kv",
            nn.initializers.normal(1.0),
            (2, self.heads, self.num_mem_kv, self.dim_head),
            jnp.float32,
        )
        return x, kernel.astype(x.dtype), mem.astype(x.dtype)

    def _project(self, x, kernel, which: int, head: int):
        """q (which=0), k (1) or v (2) of one head: [B, N, d]."""
        start = (which * self.heads + head) * self.dim_head
        return jnp.dot(x, kernel[:, start : start + self.dim_head])


class LinearAttention(_AttentionBase):
    """Linear attention (Shen et al. 2021, "Efficient Attention") with memory key/values.

    .. math::
        q \\leftarrow \\mathrm{softmax}_d(q) / \\sqrt{d},\\quad
        k \\leftarrow \\mathrm{softmax}_n(k),\\quad
        \\mathrm{out}_{n e} = \\sum_d q_{n d} \\sum_m k_{m d} v_{m e}

    followed by a 1x1 convolution and an RMSNorm. The residual is added by the caller.

    Computed as ``out = q_all @ W`` with ``W[b] = concat_h(context_h[b] @ to_out_h)``, a
    [heads * d, C] matrix per image: the per-head outputs are never formed, and the softmax of
    q over d works on a free [B, N, heads, d] view of one projection.
    """

    @nn.compact
    def __call__(self, x):
        b, hh, ww, c = x.shape
        hidden = self.heads * self.dim_head
        x, kernel, mem = self._setup(x)
        out_kernel, out_bias = _Params(hidden, c, name="to_out")()
        out_kernel, out_bias = out_kernel.astype(x.dtype), out_bias.astype(x.dtype)
        q = jnp.dot(x, kernel[:, :hidden]).reshape(b, hh * ww, self.heads, self.dim_head)
        q = jax.nn.softmax(q.astype(jnp.float32), axis=-1) * self.dim_head**-0.5
        q = q.astype(x.dtype).reshape(b, hh * ww, hidden)
        mixed = []
        for h in range(self.heads):
            k = self._project(x, kernel, 1, h).astype(jnp.float32)
            v = self._project(x, kernel, 2, h)
            # softmax of k over the memory slots and the N pixels together, without
            # concatenating them: shared maximum, one normaliser. With num_mem_kv = 0 it is
            # the softmax over the pixels alone (the reference concatenates zero slots).
            peak = jnp.max(k, axis=1, keepdims=True)  # [B, 1, d]
            if self.num_mem_kv:
                mem_k, mem_v = mem[0, h].astype(jnp.float32), mem[1, h]  # [M, d]
                peak = jnp.maximum(peak, jnp.max(mem_k, axis=0)[None, None])
            weight = jnp.exp(k - peak)
            total = jnp.sum(weight, axis=1)  # [B, d]
            context = jnp.einsum("bnd,bne->bde", weight.astype(v.dtype), v)
            if self.num_mem_kv:
                mem_weight = jnp.exp(mem_k[None] - peak)  # [B, M, d]
                total = total + jnp.sum(mem_weight, axis=1)
                context = context + jnp.einsum("bmd,me->bde", mem_weight.astype(v.dtype), mem_v)
            context = (context.astype(jnp.float32) / total[:, :, None]).astype(x.dtype)
            rows = out_kernel[h * self.dim_head : (h + 1) * self.dim_head]
            mixed.append(jnp.einsum("bde,ec->bdc", context, rows))
        out = jnp.einsum("bni,bic->bnc", q, jnp.concatenate(mixed, axis=1))
        out = (out + out_bias[None, None]).reshape(b, hh, ww, c)
        return RMSNorm(name="to_out_norm")(out)


class Attention(_AttentionBase):
    """Multi-head softmax attention over all pixels, with memory key/values.

    ``softmax(q k^T / sqrt(d)) v`` then a 1x1 convolution; the residual is added by the caller.
    """

    @nn.compact
    def __call__(self, x):
        b, hh, ww, c = x.shape
        x, kernel, mem = self._setup(x)
        out_kernel, out_bias = _Params(self.heads * self.dim_head, c, name="to_out")()
        out_kernel, out_bias = out_kernel.astype(x.dtype), out_bias.astype(x.dtype)
        out = out_bias[None, None]
        for h in range(self.heads):
            q = self._project(x, kernel, 0, h) * self.dim_head**-0.5
            k = self._project(x, kernel, 1, h)
            v = self._project(x, kernel, 2, h)
            k = jnp.concatenate([jnp.broadcast_to(mem[0, h], (b, *mem.shape[2:])), k], axis=1)
            v = jnp.concatenate([jnp.broadcast_to(mem[1, h], (b, *mem.shape[2:])), v], axis=1)
            logits = jnp.einsum("bnd,bmd->bnm", q, k).astype(jnp.float32)
            weights = jax.nn.softmax(logits, axis=-1).astype(x.dtype)
            rows = out_kernel[h * self.dim_head : (h + 1) * self.dim_head]
            out = out + jnp.dot(jnp.einsum("bnm,bmd->bnd", weights, v), rows)
        return out.reshape(b, hh, ww, c)


def _attention(spec: StageSpec, num_mem_kv: int, dtype: Any, remat: bool, name: str = "attn"):
    """The stage's attention layer (full or linear), rematerialised with ``remat``."""
    cls = Attention if spec.full_attn else LinearAttention
    cls = nn.remat(cls) if remat else cls
    return cls(spec.heads, spec.dim_head, num_mem_kv, dtype, name=name)


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


class _Stage(nn.Module):
    spec: StageSpec
    is_last: bool
    dropout: float
    num_mem_kv: int
    dtype: Any = None
    remat: bool = False


class DownStage(_Stage):
    """block1 -> skip -> block2 -> attention (+ residual) -> skip -> down-sample."""

    @nn.compact
    def __call__(self, x, t_emb, *, train: bool = False):
        spec = self.spec
        block = _resnet_block(self.remat)
        x = block(spec.dim_in, self.dropout, self.dtype, name="block1")(x, t_emb, train)
        skip1 = x
        x = block(spec.dim_in, self.dropout, self.dtype, name="block2")(x, t_emb, train)
        x = _attention(spec, self.num_mem_kv, self.dtype, self.remat)(x) + x
        skip2 = x
        if self.is_last:
            x = _conv(spec.dim_out, 3, spec.dim_in, "downsample", self.dtype)(x)
        else:
            x = space_to_depth(x)
            x = _dense(spec.dim_out, 4 * spec.dim_in, "downsample", self.dtype)(x)
        return x, (skip1, skip2)


class UpStage(_Stage):
    """concat skip2 -> block1 -> concat skip1 -> block2 -> attention (+ residual) -> up-sample."""

    @nn.compact
    def __call__(self, x, skips, t_emb, *, train: bool = False):
        spec = self.spec
        skip1, skip2 = skips
        x = jnp.concatenate([x, skip2], axis=-1)
        block = _resnet_block(self.remat)
        x = block(spec.dim_out, self.dropout, self.dtype, name="block1")(x, t_emb, train)
        x = jnp.concatenate([x, skip1], axis=-1)
        x = block(spec.dim_out, self.dropout, self.dtype, name="block2")(x, t_emb, train)
        x = _attention(spec, self.num_mem_kv, self.dtype, self.remat)(x) + x
        if not self.is_last:
            x = upsample_nearest(x)
        return _conv(spec.dim_in, 3, spec.dim_out, "upsample", self.dtype)(x)


# ----------------------------------------------------------------------------------------------
# The network


def _per_stage(value, name: str, num_stages: int) -> tuple:
    if isinstance(value, tuple | list):
        if len(value) != num_stages:
            raise ValueError(
                f"{name} has {len(value)} entries but dim_mults has {num_stages} stages; give "
                f"one per stage or a single value"
            )
        return tuple(value)
    return (value,) * num_stages


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class Unet(nn.Module):
    """The denoising-diffusion-pytorch ``Unet`` in Flax, NHWC.

    Call as ``unet.apply(variables, x, time, x_self_cond, train=..., rngs={"dropout": key})``;
    ``lambda x, t: unet.apply(variables, x, t)`` is a jaxdiff ``model_fn``.

    Attributes (the reference's constructor arguments, same names and defaults):
      dim: base width; the time embedding is ``4 * dim`` wide.
      init_dim: width of the 7x7 input convolution (default ``dim``).
      out_dim: output channels (default ``channels``, doubled with ``learned_variance``).
      dim_mults: width multiplier of each resolution; H and W must be divisible by
        ``2 ** (len(dim_mults) - 1)``.
      channels: input image channels.
      self_condition: the input is ``concat(x_self_cond, x)`` (zeros when not given).
      learned_variance: doubles the default ``out_dim`` (eps and the variance interpolation).
      learned_sinusoidal_cond / random_fourier_features: Fourier time features of width
        ``learned_sinusoidal_dim`` (learned, or fixed when ``random_fourier_features``).
      sinusoidal_pos_emb_theta: the sinusoidal embedding's base.
      dropout: dropout rate after the first Block of every ResNet block (only with ``train``).
      attn_dim_head, attn_heads: per attention layer; an int or one value per stage.
      full_attn: per stage, full (True) or linear (False) attention. As in the reference, None
        or False means "full attention in the innermost stage only", True means every stage.
        The middle attention is always full, with the innermost stage's heads and dim_head.
      flash_attn: accepted for configuration compatibility; the math is the same either way.
      num_mem_kv: memory key/value slots per attention layer (fixed at 4 in the reference).

    Execution options (not the reference's; they change no parameter):
      dtype: the computation dtype, e.g. ``"bfloat16"``. Convolutions, dense layers and
        attention products run in it; parameters stay float32 (Flax casts them per layer),
        norms, softmaxes and the time features compute in float32, and the output is float32.
        None: the dtype of the floating parameters passed to ``apply`` (float32 unless they
        were cast, e.g. to bfloat16 by ``make_train_step(compute_dtype=...)``; float32 when
        they mix dtypes), with the same float32 norms, softmaxes and output.
      remat: recompute every ResNet block's and attention layer's activations in the backward
        pass instead of storing them (``flax.linen.remat``): less memory, more compute.
    """

    dim: int
    init_dim: int | None = None
    out_dim: int | None = None
    dim_mults: tuple[int, ...] = (1, 2, 4, 8)
    channels: int = 3
    self_condition: bool = False
    learned_variance: bool = False
    learned_sinusoidal_cond: bool = False
    random_fourier_features: bool = False
    learned_sinusoidal_dim: int = 16
    sinusoidal_pos_emb_theta: float = 10000
    dropout: float = 0.0
    attn_dim_head: int | tuple[int, ...] = 32
    attn_heads: int | tuple[int, ...] = 4
    full_attn: bool | tuple[bool, ...] | None = None
    flash_attn: bool = False
    num_mem_kv: int = 4
    dtype: Any = None
    remat: bool = False

    def __post_init__(self):
        # JSON configs carry lists; module fields must stay hashable.
        for name in ("dim_mults", "attn_dim_head", "attn_heads", "full_attn"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        self._validate()
        super().__post_init__()

    def _validate(self) -> None:
        if not _is_int(self.dim) or self.dim < 1:
            raise ValueError(f"dim must be a positive int, got {self.dim!r}")
        if (
            not isinstance(self.dim_mults, tuple)
            or not self.dim_mults
            or not all(_is_int(m) and m >= 1 for m in self.dim_mults)
        ):
            raise ValueError(
                f"dim_mults must be a non-empty tuple of positive ints, got {self.dim_mults!r}"
            )
        for name in ("init_dim", "out_dim"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise ValueError(f"{name} must be None or a positive int, got {value!r}")
        for name in ("channels", "learned_sinusoidal_dim"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not _is_int(self.num_mem_kv) or self.num_mem_kv < 0:
            raise ValueError(f"num_mem_kv must be an int >= 0, got {self.num_mem_kv!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.random_or_learned_sinusoidal_cond:
            if self.learned_sinusoidal_dim % 2:
                raise ValueError(
                    "learned_sinusoidal_dim must be even with learned_sinusoidal_cond or "
                    f"random_fourier_features, got {self.learned_sinusoidal_dim}"
                )
        elif self.dim < 4 or self.dim % 2:
            raise ValueError(
                f"the sinusoidal time embedding needs an even dim >= 4 (its frequencies divide "
                f"by dim / 2 - 1), got dim={self.dim}"
            )
        if not self.sinusoidal_pos_emb_theta > 0:
            raise ValueError(
                f"sinusoidal_pos_emb_theta must be > 0, got {self.sinusoidal_pos_emb_theta!r}"
            )
        stages = len(self.dim_mults)
        heads = _per_stage(self.attn_heads, "attn_heads", stages)
        dim_head = _per_stage(self.attn_dim_head, "attn_dim_head", stages)
        for name, values in (("attn_heads", heads), ("attn_dim_head", dim_head)):
            if not all(_is_int(v) and v >= 1 for v in values):
                raise ValueError(f"{name} must be positive ints, got {getattr(self, name)!r}")
        full = self._full_attn()
        if not all(isinstance(f, bool) for f in full):
            raise ValueError(f"full_attn must be None, a bool or bools, got {self.full_attn!r}")
        self.compute_dtype  # noqa: B018 - validates dtype
        if not isinstance(self.remat, bool):
            raise ValueError(f"remat must be a bool, got {self.remat!r}")

    @property
    def compute_dtype(self) -> jnp.dtype:
        """The computation dtype with float32 parameters (``dtype``, float32 when None)."""
        if self.dtype is None:
            return jnp.dtype(jnp.float32)
        try:
            dtype = jnp.dtype(self.dtype)
        except TypeError:
            dtype = None
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(
                f"dtype must be None or a floating dtype such as 'bfloat16', got {self.dtype!r}"
            )
        return dtype

    # ------------------------------------------------------------------ derived configuration

    @property
    def random_or_learned_sinusoidal_cond(self) -> bool:
        return bool(self.learned_sinusoidal_cond or self.random_fourier_features)

    @property
    def resolved_init_dim(self) -> int:
        return self.dim if self.init_dim is None else self.init_dim

    @property
    def resolved_out_dim(self) -> int:
        if self.out_dim is not None:
            return self.out_dim
        return self.channels * (2 if self.learned_variance else 1)

    @property
    def input_channels(self) -> int:
        """Channels of the first convolution's input (doubled by self-conditioning)."""
        return self.channels * (2 if self.self_condition else 1)

    @property
    def time_dim(self) -> int:
        return 4 * self.dim

    @property
    def fourier_dim(self) -> int:
        if self.random_or_learned_sinusoidal_cond:
            return self.learned_sinusoidal_dim + 1
        return self.dim

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.dim_mults) - 1)

    def _full_attn(self) -> tuple:
        stages = len(self.dim_mults)
        # The reference tests truthiness: None, False and () all mean the default.
        if not self.full_attn:
            return (False,) * (stages - 1) + (True,)
        return _per_stage(self.full_attn, "full_attn", stages)

    def stages(self) -> tuple[StageSpec, ...]:
        """The down path's resolutions, outermost first (the up path uses them reversed)."""
        num = len(self.dim_mults)
        dims = [self.resolved_init_dim, *(self.dim * m for m in self.dim_mults)]
        heads = _per_stage(self.attn_heads, "attn_heads", num)
        dim_head = _per_stage(self.attn_dim_head, "attn_dim_head", num)
        full = self._full_attn()
        return tuple(
            StageSpec(dims[i], dims[i + 1], full[i], heads[i], dim_head[i]) for i in range(num)
        )

    def config(self) -> dict[str, Any]:
        """The options as a JSON-ready dict (``unet_from_config`` inverts it)."""
        out = {}
        for name in CONFIG_FIELDS:
            value = getattr(self, name)
            out[name] = list(value) if isinstance(value, tuple) else value
        return out

    # ------------------------------------------------------------------ forward

    def _apply_dtype(self) -> jnp.dtype:
        """``dtype`` when set; else the one floating dtype of the parameters being applied
        (float32 at init, when there are none, or when they mix dtypes)."""
        if self.dtype is not None:
            return self.compute_dtype
        dtypes = {
            leaf.dtype
            for leaf in jax.tree.leaves(self.variables.get("params", {}))
            if jnp.issubdtype(leaf.dtype, jnp.floating)
        }
        return dtypes.pop() if len(dtypes) == 1 else jnp.dtype(jnp.float32)

    def _check_inputs(self, x, time, x_self_cond):
        if x.ndim != 4:
            raise ValueError(f"x must be [B, H, W, C] (channels last), got shape {x.shape}")
        b, h, w, c = x.shape
        if c != self.channels:
            raise ValueError(
                f"x has {c} channels (last axis) but the Unet has channels={self.channels}; "
                f"got shape {x.shape} (jaxdiff is channels-last: NHWC, not NCHW)"
            )
        factor = self.downsample_factor
        if h % factor or w % factor:
            raise ValueError(
                f"image size {h}x{w} must be divisible by {factor} = 2 ** (len(dim_mults) - 1) "
                f"for dim_mults={self.dim_mults}"
            )
        if time.shape not in ((), (b,)):
            raise ValueError(f"time must be [B] = [{b}] or a scalar, got shape {time.shape}")
        if x_self_cond is not None:
            if not self.self_condition:
                raise ValueError(
                    "x_self_cond was given but the Unet has self_condition=False; build it with "
                    "self_condition=True or drop x_self_cond"
                )
            if x_self_cond.shape != x.shape:
                raise ValueError(
                    f"x_self_cond must have the shape of x {x.shape}, got {x_self_cond.shape}"
                )

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        time: jax.Array,
        x_self_cond: jax.Array | None = None,
        *,
        train: bool = False,
    ) -> jax.Array:
        """The network output [B, H, W, out_dim] for a noisy image x [B, H, W, channels].

        Args:
          x: the input, channels last (any floating dtype; cast to the compute dtype).
          time: [B] (or a scalar), the reference's raw time input: the integer step 0..T-1 for
            discrete diffusion, log-SNR for the continuous-time classes.
          x_self_cond: the self-conditioning x0 estimate, shape of x; zeros when None. Only
            with ``self_condition=True``.
          train: enables dropout, drawn from the ``'dropout'`` rng collection.
        """
        dtype = self._apply_dtype()
        x = jnp.asarray(x, jnp.float32).astype(dtype)
        time = jnp.asarray(time)
        if x_self_cond is not None:
            x_self_cond = jnp.asarray(x_self_cond, jnp.float32).astype(dtype)
        self._check_inputs(x, time, x_self_cond)
        time = jnp.broadcast_to(time.astype(jnp.float32), (x.shape[0],))

        if self.self_condition:
            if x_self_cond is None:
                x_self_cond = jnp.zeros_like(x)
            x = jnp.concatenate([x_self_cond, x], axis=-1)

        init_dim = self.resolved_init_dim
        x = _conv(init_dim, 7, self.input_channels, "init_conv", dtype)(x)
        r = x

        if self.random_or_learned_sinusoidal_cond:
            emb = FourierEmbedding(
                self.learned_sinusoidal_dim, self.random_fourier_features, name="time_fourier"
            )(time)
        else:
            emb = sinusoidal_embedding(time, self.dim, self.sinusoidal_pos_emb_theta)
        t = _dense(self.time_dim, self.fourier_dim, "time_mlp_in", dtype)(emb)
        t = nn.gelu(t, approximate=False)
        t = _dense(self.time_dim, self.time_dim, "time_mlp_out", dtype)(t)

        specs = self.stages()
        num = len(specs)
        skips = []
        for i, spec in enumerate(specs):
            stage = DownStage(
                spec,
                i == num - 1,
                self.dropout,
                self.num_mem_kv,
                dtype,
                self.remat,
                name=f"downs_{i}",
            )
            x, stage_skips = stage(x, t, train=train)
            skips.append(stage_skips)

        mid = specs[-1].dim_out
        mid_spec = specs[-1]._replace(full_attn=True)
        block = _resnet_block(self.remat)
        x = block(mid, self.dropout, dtype, name="mid_block1")(x, t, train)
        mid_attn = _attention(mid_spec, self.num_mem_kv, dtype, self.remat, "mid_attn")
        x = mid_attn(x) + x
        x = block(mid, self.dropout, dtype, name="mid_block2")(x, t, train)

        for j, spec in enumerate(reversed(specs)):
            stage = UpStage(
                spec,
                j == num - 1,
                self.dropout,
                self.num_mem_kv,
                dtype,
                self.remat,
                name=f"ups_{j}",
            )
            x = stage(x, skips.pop(), t, train=train)

        x = jnp.concatenate([x, r], axis=-1)
        x = block(init_dim, self.dropout, dtype, name="final_res_block")(x, t, train)
        out = _dense(self.resolved_out_dim, init_dim, "final_conv", dtype)(x)
        return out.astype(jnp.float32)


def unet_from_config(config: Mapping[str, Any] | str | Unet, **options) -> Unet:
    """A :class:`Unet` from a dict of the reference's constructor arguments, a JSON string, a
    preset name (see ``PRESETS``) or a Unet (returned as it is, or with ``options`` replaced).

    ``options`` are the execution options ``dtype`` and ``remat``. Unknown keys raise a
    ``ValueError`` naming them; lists become tuples.
    """
    unknown = sorted(set(options) - {"dtype", "remat"})
    if unknown:
        raise ValueError(f"unknown Unet execution option(s) {unknown}; they are dtype and remat")
    if isinstance(config, Unet):
        return config.clone(**options) if options else config
    if isinstance(config, str):
        if config in PRESETS:
            config = PRESETS[config]
        else:
            try:
                config = json.loads(config)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"config {config!r} is neither a preset ({', '.join(sorted(PRESETS))}) "
                    f"nor JSON: {error}"
                ) from None
    if not isinstance(config, Mapping):
        raise ValueError(f"a Unet config must be a mapping, got {type(config).__name__}")
    unknown = sorted(set(config) - set(CONFIG_FIELDS))
    if unknown:
        raise ValueError(
            f"unknown Unet option(s) {unknown}; the options are {', '.join(CONFIG_FIELDS)}"
        )
    if "dim" not in config:
        raise ValueError("a Unet config needs 'dim'")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    return Unet(**kwargs, **options)
