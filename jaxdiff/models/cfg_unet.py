"""The class-conditional U-Net of denoising-diffusion-pytorch in Flax linen, channels-last, and
its classifier-free guidance.

Same architecture, options and numerics as ``denoising_diffusion_pytorch.classifier_free_guidance
.Unet`` (version 2.3.4), so that its weights, imported with :mod:`jaxdiff.convert`, give the same
outputs (checked by ``tests/parity/test_cfg_unet_parity.py``). It is the lucid ``Unet`` of
:mod:`jaxdiff.models.unet` with these differences, all the reference's:

* a class embedding: ``classes_emb [num_classes, dim]`` (or the learned ``null_classes_emb
  [dim]`` for "no class"), then ``Dense -> GELU (exact) -> Dense`` to ``4 * dim``; every ResNet
  block's scale/shift layer reads ``concat(time_emb, class_emb)``;
* every stage uses linear attention with the reference's fixed 4 heads of 32 (``attn_heads`` and
  ``attn_dim_head`` set only the middle full attention), and no layer has memory key/values;
* down-sampling is a 4x4 stride-2 convolution with padding 1 (not space-to-depth);
* no self-conditioning, dropout, ``full_attn``, ``flash_attn`` or embedding ``theta`` options
  (the sinusoidal base is 10000).

Conditioning is functional: ``label`` holds a class index per example, and ``-1`` (``NULL_LABEL``)
selects the null embedding. The reference's random label dropout (``cond_drop_prob``) is the
training objective's job, which replaces labels by -1 with that probability; the network itself
never draws. :func:`jaxdiff.guidance.guided_output` (also exported from :mod:`jaxdiff.models`)
combines a conditional and an unconditional output as the reference's
``forward_with_cond_scale`` does.

Reference: Ho & Salimans 2022, "Classifier-Free Diffusion Guidance";
lucidrains/denoising-diffusion-pytorch 2.3.4.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.models.attention import Attention, LinearAttention
from jaxdiff.models.layers import (
    FourierEmbedding,
    _apply_dtype,
    _compute_dtype,
    _conv,
    _dense,
    _is_int,
    _resnet_block,
    _torch_bias_init,
    _torch_kernel_init,
    sinusoidal_embedding,
    upsample_nearest,
)

__all__ = [
    "CFG_CONFIG_FIELDS",
    "CFG_PRESETS",
    "NULL_LABEL",
    "ClassConditionalUnet",
    "cfg_unet_from_config",
]

# The reference's constructor arguments, in its order.
CFG_CONFIG_FIELDS = (
    "dim",
    "num_classes",
    "cond_drop_prob",
    "init_dim",
    "out_dim",
    "dim_mults",
    "channels",
    "learned_variance",
    "learned_sinusoidal_cond",
    "random_fourier_features",
    "learned_sinusoidal_dim",
    "attn_dim_head",
    "attn_heads",
)

# Named configurations for ``cfg_unet_from_config`` (prefixed, so they never shadow ``PRESETS``).
CFG_PRESETS: dict[str, dict[str, Any]] = {
    # The example network at the end of the reference's classifier_free_guidance.py.
    "cfg-readme": {"dim": 64, "dim_mults": (1, 2, 4, 8), "num_classes": 10, "cond_drop_prob": 0.5},
    # A tiny network for tests and smoke runs.
    "cfg-tiny": {
        "dim": 8,
        "dim_mults": (1, 2),
        "num_classes": 10,
        "attn_heads": 2,
        "attn_dim_head": 4,
    },
}

NULL_LABEL = -1  # "no class": the null embedding (label dropout, the unconditional half of CFG)

# The reference builds every stage's LinearAttention with its defaults.
LINEAR_ATTN_HEADS = 4
LINEAR_ATTN_DIM_HEAD = 32

_SINUSOIDAL_THETA = 10000.0  # fixed in the reference's cfg SinusoidalPosEmb


# ----------------------------------------------------------------------------------------------
# Layers that differ from the lucid Unet's


class _NoMemoryLinearAttention(LinearAttention):
    """:class:`LinearAttention` without memory key/values and without the ``mem_kv`` parameter
    (the cfg reference has neither); used with ``num_mem_kv=0``."""

    def _memory(self) -> jax.Array:
        return jnp.zeros((2, self.heads, 0, self.dim_head), jnp.float32)


class _NoMemoryAttention(Attention):
    """:class:`Attention` without memory key/values and without the ``mem_kv`` parameter."""

    def _memory(self) -> jax.Array:
        return jnp.zeros((2, self.heads, 0, self.dim_head), jnp.float32)


def _attention(full: bool, heads: int, dim_head: int, dtype: Any, remat: bool, name: str):
    cls = _NoMemoryAttention if full else _NoMemoryLinearAttention
    cls = nn.remat(cls) if remat else cls
    return cls(heads, dim_head, 0, dtype, name=name)


def _downsample(features: int, fan_in_channels: int, dtype: Any) -> nn.Conv:
    """The reference's ``Downsample``: ``Conv2d(dim, dim_out, 4, stride 2, padding 1)``."""
    return nn.Conv(
        features,
        (4, 4),
        strides=(2, 2),
        dtype=dtype,
        padding=((1, 1), (1, 1)),
        kernel_init=_torch_kernel_init(),
        bias_init=_torch_bias_init(fan_in_channels * 16),
        name="downsample",
    )


class _Stage(nn.Module):
    dim_in: int
    dim_out: int
    is_last: bool
    dtype: Any = None
    remat: bool = False

    def _attend(self, x):
        heads, dim_head = LINEAR_ATTN_HEADS, LINEAR_ATTN_DIM_HEAD
        return _attention(False, heads, dim_head, self.dtype, self.remat, "attn")(x) + x


class _DownStage(_Stage):
    """block1 -> skip -> block2 -> linear attention (+ residual) -> skip -> down-sample."""

    @nn.compact
    def __call__(self, x, cond, train: bool = False):
        block = _resnet_block(self.remat)
        x = block(self.dim_in, 0.0, self.dtype, name="block1")(x, cond, train)
        skip1 = x
        x = block(self.dim_in, 0.0, self.dtype, name="block2")(x, cond, train)
        x = self._attend(x)
        skip2 = x
        if self.is_last:
            x = _conv(self.dim_out, 3, self.dim_in, "downsample", self.dtype)(x)
        else:
            x = _downsample(self.dim_out, self.dim_in, self.dtype)(x)
        return x, (skip1, skip2)


class _UpStage(_Stage):
    """concat skip2 -> block1 -> concat skip1 -> block2 -> linear attention (+ residual) ->
    nearest up-sampling (except the outermost stage) -> 3x3 convolution."""

    @nn.compact
    def __call__(self, x, skips, cond, train: bool = False):
        skip1, skip2 = skips
        block = _resnet_block(self.remat)
        x = jnp.concatenate([x, skip2], axis=-1)
        x = block(self.dim_out, 0.0, self.dtype, name="block1")(x, cond, train)
        x = jnp.concatenate([x, skip1], axis=-1)
        x = block(self.dim_out, 0.0, self.dtype, name="block2")(x, cond, train)
        x = self._attend(x)
        if not self.is_last:
            x = upsample_nearest(x)
        return _conv(self.dim_in, 3, self.dim_out, "upsample", self.dtype)(x)


# ----------------------------------------------------------------------------------------------
# The network


class ClassConditionalUnet(nn.Module):
    """The denoising-diffusion-pytorch classifier-free-guidance ``Unet`` in Flax, NHWC.

    Call as ``model.apply(variables, x, time, label=labels, train=False)``; ``label`` is an int
    array [B] of class indices in ``[0, num_classes)``, or ``-1`` (``NULL_LABEL``) for "no
    class", which uses the learned null embedding: that is how label dropout in training and
    the unconditional output of classifier-free guidance are expressed. ``lambda x, t, label:
    model.apply(variables, x, t, label=label)`` is a jaxdiff ``model_fn``.

    Attributes (the reference's constructor arguments, same names and defaults):
      dim: base width; the time and class embeddings are ``4 * dim`` wide.
      num_classes: number of classes (rows of ``classes_emb``).
      cond_drop_prob: the probability with which the training objective replaces a label by
        -1 (the reference drops inside its forward pass; here the network never does). Kept so
        that a configuration records it; the network's output does not depend on it.
      init_dim: width of the 7x7 input convolution (default ``dim``).
      out_dim: output channels (default ``channels``, doubled with ``learned_variance``).
      dim_mults: width multiplier of each resolution; H and W must be divisible by
        ``2 ** (len(dim_mults) - 1)``.
      channels: input image channels.
      learned_variance: doubles the default ``out_dim``.
      learned_sinusoidal_cond / random_fourier_features: Fourier time features of width
        ``learned_sinusoidal_dim`` (learned, or fixed when ``random_fourier_features``).
      attn_dim_head, attn_heads: of the middle full attention (ints). Every stage's linear
        attention has 4 heads of 32, as in the reference.

    Execution options (not the reference's; they change no parameter), as in
    :class:`~jaxdiff.models.Unet`:
      dtype: the computation dtype, e.g. ``"bfloat16"``; None: the dtype of the floating
        parameters passed to ``apply``. Norms, softmaxes and the time features compute in
        float32, and the output is float32.
      remat: recompute every ResNet block's and attention layer's activations in the backward
        pass instead of storing them.
    """

    dim: int
    num_classes: int
    cond_drop_prob: float = 0.5
    init_dim: int | None = None
    out_dim: int | None = None
    dim_mults: tuple[int, ...] = (1, 2, 4, 8)
    channels: int = 3
    learned_variance: bool = False
    learned_sinusoidal_cond: bool = False
    random_fourier_features: bool = False
    learned_sinusoidal_dim: int = 16
    attn_dim_head: int = 32
    attn_heads: int = 4
    dtype: Any = None
    remat: bool = False

    def __post_init__(self):
        if isinstance(self.dim_mults, list):  # JSON configs carry lists
            object.__setattr__(self, "dim_mults", tuple(self.dim_mults))
        self._validate()
        super().__post_init__()

    def _validate(self) -> None:
        for name in ("dim", "num_classes", "channels", "learned_sinusoidal_dim"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
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
        for name in ("attn_heads", "attn_dim_head"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(
                    f"{name} must be a positive int (the middle attention's; the reference "
                    f"takes no per-stage values), got {value!r}"
                )
        if isinstance(self.cond_drop_prob, bool) or not (
            isinstance(self.cond_drop_prob, int | float) and 0.0 <= self.cond_drop_prob <= 1.0
        ):
            raise ValueError(f"cond_drop_prob must be in [0, 1], got {self.cond_drop_prob!r}")
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
    def time_dim(self) -> int:
        return 4 * self.dim

    @property
    def classes_dim(self) -> int:
        return 4 * self.dim

    @property
    def fourier_dim(self) -> int:
        if self.random_or_learned_sinusoidal_cond:
            return self.learned_sinusoidal_dim + 1
        return self.dim

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.dim_mults) - 1)

    def stages(self) -> tuple[tuple[int, int], ...]:
        """``(dim_in, dim_out)`` of each resolution of the down path, outermost first."""
        dims = [self.resolved_init_dim, *(self.dim * m for m in self.dim_mults)]
        return tuple(zip(dims[:-1], dims[1:], strict=True))

    def config(self) -> dict[str, Any]:
        """The options as a JSON-ready dict (``cfg_unet_from_config`` inverts it)."""
        out = {}
        for name in CFG_CONFIG_FIELDS:
            value = getattr(self, name)
            out[name] = list(value) if isinstance(value, tuple) else value
        return out

    # ------------------------------------------------------------------ forward

    def _check_inputs(self, x, time, label):
        if x.ndim != 4:
            raise ValueError(f"x must be [B, H, W, C] (channels last), got shape {x.shape}")
        b, h, w, c = x.shape
        if c != self.channels:
            raise ValueError(
                f"x has {c} channels (last axis) but the network has channels={self.channels}; "
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
        if label is None:
            raise ValueError(
                "ClassConditionalUnet needs label=: an int array [B] of class indices in "
                f"[0, {self.num_classes}), or -1 for no class (the null embedding; pass "
                "jnp.full((B,), -1) for the unconditional output)"
            )
        label = jnp.asarray(label)
        if not jnp.issubdtype(label.dtype, jnp.integer):
            raise ValueError(
                f"label must be an integer array (class indices, -1 for none), got dtype "
                f"{label.dtype}"
            )
        if label.shape not in ((), (b,)):
            raise ValueError(f"label must be [B] = [{b}] or a scalar, got shape {label.shape}")
        return label

    def _check_label_range(self, label) -> None:
        """Concrete labels must lie in [-1, num_classes); traced ones are clamped instead."""
        if isinstance(label, jax.core.Tracer):
            return
        values = np.asarray(label)
        bad = (values < NULL_LABEL) | (values >= self.num_classes)
        if bad.any():
            raise ValueError(
                f"label values must be in [-1, {self.num_classes}) (class indices for "
                f"num_classes={self.num_classes}, -1 for no class), got "
                f"{sorted(set(values[bad].tolist()))[:8]}"
            )

    def _class_embedding(self, label: jax.Array) -> jax.Array:
        """``classes_emb[label]``, or ``null_classes_emb`` where label < 0: [B, dim].

        Under ``jit`` a label outside [-1, num_classes) is not checked: negative ones read the
        null embedding and ones >= num_classes the last class, so nothing reads out of bounds.
        """
        table = self.param(
            "classes_emb", nn.initializers.normal(1.0), (self.num_classes, self.dim), jnp.float32
        )
        null = self.param("null_classes_emb", nn.initializers.normal(1.0), (self.dim,), jnp.float32)
        rows = table[jnp.clip(label, 0, self.num_classes - 1)]
        return jnp.where((label >= 0)[:, None], rows, null[None, :].astype(rows.dtype))

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        time: jax.Array,
        label: jax.Array | None = None,
        *,
        train: bool = False,
    ) -> jax.Array:
        """The network output [B, H, W, out_dim] for a noisy image x [B, H, W, channels].

        Args:
          x: the input, channels last (any floating dtype; cast to the compute dtype).
          time: [B] (or a scalar), the reference's raw time input (the integer step 0..T-1 for
            discrete diffusion).
          label: [B] (or a scalar) int class indices in [0, num_classes), -1 for no class.
            Required.
          train: accepted for the common call protocol; the network has no dropout, so it
            changes nothing.

        Raises:
          ValueError: for a missing or non-integer label, concrete label values outside
            [-1, num_classes), and mis-shaped inputs.
        """
        del train  # no dropout in the reference's cfg Unet
        dtype = _apply_dtype(self.dtype, self.variables)
        x = jnp.asarray(x, jnp.float32).astype(dtype)
        time = jnp.asarray(time)
        label = self._check_inputs(x, time, label)
        self._check_label_range(label)
        b = x.shape[0]
        time = jnp.broadcast_to(time.astype(jnp.float32), (b,))
        label = jnp.broadcast_to(label, (b,))

        c = self._class_embedding(label)
        c = _dense(self.classes_dim, self.dim, "classes_mlp_in", dtype)(c)
        c = nn.gelu(c, approximate=False)
        c = _dense(self.classes_dim, self.classes_dim, "classes_mlp_out", dtype)(c)

        init_dim = self.resolved_init_dim
        x = _conv(init_dim, 7, self.channels, "init_conv", dtype)(x)
        r = x

        if self.random_or_learned_sinusoidal_cond:
            emb = FourierEmbedding(
                self.learned_sinusoidal_dim, self.random_fourier_features, name="time_fourier"
            )(time)
        else:
            emb = sinusoidal_embedding(time, self.dim, _SINUSOIDAL_THETA)
        t = _dense(self.time_dim, self.fourier_dim, "time_mlp_in", dtype)(emb)
        t = nn.gelu(t, approximate=False)
        t = _dense(self.time_dim, self.time_dim, "time_mlp_out", dtype)(t)
        # every ResNet block's scale/shift layer reads the two embeddings side by side
        cond = jnp.concatenate([t, c.astype(t.dtype)], axis=-1)

        stages = self.stages()
        num = len(stages)
        skips = []
        for i, (dim_in, dim_out) in enumerate(stages):
            stage = _DownStage(dim_in, dim_out, i == num - 1, dtype, self.remat, name=f"downs_{i}")
            x, stage_skips = stage(x, cond, train=False)
            skips.append(stage_skips)

        mid = stages[-1][1]
        block = _resnet_block(self.remat)
        x = block(mid, 0.0, dtype, name="mid_block1")(x, cond, False)
        mid_attn = _attention(
            True, self.attn_heads, self.attn_dim_head, dtype, self.remat, "mid_attn"
        )
        x = mid_attn(x) + x
        x = block(mid, 0.0, dtype, name="mid_block2")(x, cond, False)

        for j, (dim_in, dim_out) in enumerate(reversed(stages)):
            stage = _UpStage(dim_in, dim_out, j == num - 1, dtype, self.remat, name=f"ups_{j}")
            x = stage(x, skips.pop(), cond, train=False)

        x = jnp.concatenate([x, r], axis=-1)
        x = block(init_dim, 0.0, dtype, name="final_res_block")(x, cond, False)
        out = _dense(self.resolved_out_dim, init_dim, "final_conv", dtype)(x)
        return out.astype(jnp.float32)


def cfg_unet_from_config(
    config: Mapping[str, Any] | str | ClassConditionalUnet, **options
) -> ClassConditionalUnet:
    """A :class:`ClassConditionalUnet` from a dict of the reference's constructor arguments, a
    JSON string, a preset name (see ``CFG_PRESETS``) or a ClassConditionalUnet (returned as it
    is, or with ``options`` replaced).

    ``options`` are the execution options ``dtype`` and ``remat``. Unknown keys raise a
    ``ValueError`` naming them; lists become tuples.
    """
    unknown = sorted(set(options) - {"dtype", "remat"})
    if unknown:
        raise ValueError(
            f"unknown ClassConditionalUnet execution option(s) {unknown}; they are dtype and remat"
        )
    if isinstance(config, ClassConditionalUnet):
        return config.clone(**options) if options else config
    if isinstance(config, str):
        if config in CFG_PRESETS:
            config = CFG_PRESETS[config]
        else:
            try:
                config = json.loads(config)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"config {config!r} is neither a preset ({', '.join(sorted(CFG_PRESETS))}) "
                    f"nor JSON: {error}"
                ) from None
    if not isinstance(config, Mapping):
        raise ValueError(
            f"a ClassConditionalUnet config must be a mapping, got {type(config).__name__}"
        )
    unknown = sorted(set(config) - set(CFG_CONFIG_FIELDS))
    if unknown:
        raise ValueError(
            f"unknown ClassConditionalUnet option(s) {unknown}; the options are "
            f"{', '.join(CFG_CONFIG_FIELDS)}"
        )
    missing = [name for name in ("dim", "num_classes") if name not in config]
    if missing:
        raise ValueError(f"a ClassConditionalUnet config needs {missing}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    return ClassConditionalUnet(**kwargs, **options)
