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
from scratch starts from the same distribution as the reference. The layers are in
:mod:`jaxdiff.models.layers` and :mod:`jaxdiff.models.attention`, shared with the
class-conditional network (:mod:`jaxdiff.models.cfg_unet`).

Reference: Ho et al. 2020 (the U-Net of DDPM, Appendix B); lucidrains/denoising-diffusion-pytorch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

# Attention, LinearAttention and RMSNorm are re-exported: tests and experiments/profile_unet.py
# reach them through this module.
from jaxdiff.models.attention import Attention, LinearAttention
from jaxdiff.models.layers import (
    FourierEmbedding,
    RMSNorm,
    _apply_dtype,
    _compute_dtype,
    _conv,
    _dense,
    _is_int,
    _resnet_block,
    sinusoidal_embedding,
    space_to_depth,
    upsample_nearest,
)

__all__ = [
    "PRESETS",
    "Attention",
    "LinearAttention",
    "RMSNorm",
    "StageSpec",
    "Unet",
    "sinusoidal_embedding",
    "unet_from_config",
]

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


class StageSpec(NamedTuple):
    """One resolution of the down path (the up path visits them in reverse)."""

    dim_in: int  # channels entering the stage (and of its ResNet blocks and attention)
    dim_out: int  # channels after its down-sampling convolution
    full_attn: bool  # full softmax attention (True) or linear attention (False)
    heads: int
    dim_head: int


# ----------------------------------------------------------------------------------------------
# Stages


def _attention(spec: StageSpec, num_mem_kv: int, dtype: Any, remat: bool, name: str = "attn"):
    """The stage's attention layer (full or linear), rematerialised with ``remat``."""
    cls = Attention if spec.full_attn else LinearAttention
    cls = nn.remat(cls) if remat else cls
    return cls(spec.heads, spec.dim_head, num_mem_kv, dtype, name=name)


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
        return _compute_dtype(self.dtype)

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
        return _apply_dtype(self.dtype, self.variables)

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
