"""openai's diffusion U-Nets in Flax linen, channels-last: ``UNetModel`` (improved-diffusion and
guided-diffusion), ``SuperResModel`` and guided-diffusion's noisy classifier ``EncoderUNetModel``.

Same architecture, options and numerics as the references, so that their checkpoints, imported
with :mod:`jaxdiff.convert_openai`, give the same outputs (checked to float32 round-off by
``tests/parity/test_openai_unet_parity.py``). What ``UNetModel`` computes:

* the time embedding: ``timestep_embedding(t, model_channels)`` (cos first), then
  ``Linear -> SiLU -> Linear`` to ``4 * model_channels``, plus a learned class embedding
  (``num_classes``);
* a 3x3 input convolution, then per level ``num_res_blocks`` ResBlocks (each followed by
  self-attention where the level's down-sampling rate is in ``attention_resolutions``) and,
  except at the last level, a down-sampling (stride-2 conv, 2x2 average pooling, or a
  down-sampling ResBlock with ``resblock_updown``); every block's output is kept for the way up;
* a middle ResBlock, attention, ResBlock;
* going up, ``num_res_blocks + 1`` ResBlocks per level, each fed ``concat(h, skip)`` (h first),
  with attention as on the way down and an up-sampling at the end of each level but the last;
* GroupNorm, SiLU and a 3x3 convolution to ``out_channels`` (``2 * C`` with learned sigma).

GroupNorm (32 groups) always computes in float32; SiLU is ``x * sigmoid(x)``; attention scales q
and k each by ``ch ** -1/4``. The two repositories build the same module tree and state_dict
keys for the options they share (checked on both); ``layout="improved"`` refuses the options
improved-diffusion's UNetModel lacks (``num_head_channels``, ``resblock_updown``,
``use_new_attention_order``) and ``channel_mult[0] != 1``, which improved-diffusion cannot run
(its output convolution expects ``model_channels`` inputs). improved-diffusion's ``Downsample``
cannot be built with ``conv_resample=False`` (it calls ``avg_pool_nd(2)`` without a kernel
size); jaxdiff uses 2x2 average pooling there, as guided-diffusion does.

Reference: openai/improved-diffusion 1bc7bbb, openai/guided-diffusion 22e0df8 (``unet.py``);
Nichol & Dhariwal 2021 ("Improved DDPM"), Dhariwal & Nichol 2021 ("Diffusion Models Beat GANs",
Section 3 and Appendix C).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.models.layers import _apply_dtype, _compute_dtype, _is_int
from jaxdiff.models.openai_layers import (
    NUM_GROUPS,
    AttentionPool2d,
    BlockOptions,
    EmbedSequential,
    GroupNorm32,
    Plan,
    _conv,
    _dense,
    _width,
    build_plan,
    resize_bilinear,
    timestep_embedding,
)

__all__ = [
    "LAYOUTS",
    "POOLS",
    "EncoderUNetModel",
    "SuperResModel",
    "UNetModel",
    "openai_model_from_config",
]

LAYOUTS = ("guided", "improved")
POOLS = ("adaptive", "attention", "spatial", "spatial_v2")
SPATIAL_HIDDEN = 2048  # the width of the "spatial" pools' hidden layer, fixed in the reference

# The reference options of each model (the constructor arguments, in order, without the
# use_checkpoint / use_fp16 execution flags), for config() and openai_model_from_config.
_SHARED_FIELDS = tuple(
    "image_size in_channels model_channels out_channels num_res_blocks attention_resolutions "
    "dropout channel_mult conv_resample dims".split()
)
_HEAD_FIELDS = tuple(
    "num_heads num_head_channels num_heads_upsample use_scale_shift_norm resblock_updown "
    "use_new_attention_order".split()
)
_BOOL_FIELDS = tuple(
    "conv_resample use_scale_shift_norm resblock_updown use_new_attention_order".split()
)
UNET_FIELDS = (*_SHARED_FIELDS, "num_classes", *_HEAD_FIELDS, "layout")
ENCODER_FIELDS = (*_SHARED_FIELDS, *_HEAD_FIELDS, "pool")


class _OpenAIBase(nn.Module):
    """Options and the down path shared by UNetModel and EncoderUNetModel (see UNetModel)."""

    in_channels: int
    model_channels: int
    out_channels: int
    num_res_blocks: int
    attention_resolutions: tuple[int, ...]
    dropout: float = 0.0
    channel_mult: tuple[float, ...] = (1, 2, 4, 8)
    conv_resample: bool = True
    dims: int = 2
    num_heads: int = 1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    image_size: int | None = None
    dtype: Any = None
    remat: bool = False

    def __post_init__(self):
        # JSON configs carry lists and the references accept any collection; fields stay hashable
        if isinstance(self.channel_mult, list):
            object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        resolutions = self.attention_resolutions
        if isinstance(resolutions, list | set | frozenset | tuple):
            object.__setattr__(self, "attention_resolutions", tuple(sorted(set(resolutions))))
        self._validate()
        super().__post_init__()

    # ------------------------------------------------------------------ validation

    def _validate(self) -> None:
        if self.dims != 2:
            raise ValueError(
                f"dims={self.dims!r} is not supported: jaxdiff's openai networks are 2-D only "
                "(images, [B, H, W, C]); the reference's 1-D and 3-D variants have no Flax "
                "counterpart. Use dims=2"
            )
        for name in ("in_channels", "model_channels", "out_channels", "num_heads"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not _is_int(self.num_res_blocks) or self.num_res_blocks < 0:
            raise ValueError(f"num_res_blocks must be an int >= 0, got {self.num_res_blocks!r}")
        for name in ("num_head_channels", "num_heads_upsample"):
            value = getattr(self, name)
            if not _is_int(value) or not (value == -1 or value >= 1):
                raise ValueError(f"{name} must be -1 (unset) or a positive int, got {value!r}")
        if not isinstance(self.attention_resolutions, tuple) or not all(
            _is_int(r) and r >= 1 for r in self.attention_resolutions
        ):
            raise ValueError(
                "attention_resolutions must be a collection of positive ints, the down-sampling "
                f"rates (image_size // resolution); got {self.attention_resolutions!r}"
            )
        mults = self.channel_mult
        if (
            not isinstance(mults, tuple)
            or not mults
            or not all(isinstance(m, int | float) and not isinstance(m, bool) for m in mults)
            or not all(m > 0 for m in mults)
        ):
            raise ValueError(
                f"channel_mult must be a non-empty tuple of positive numbers, got {mults!r}"
            )
        for level, mult in enumerate(mults):
            width = _width(mult, self.model_channels)
            if width < NUM_GROUPS or width % NUM_GROUPS:
                raise ValueError(
                    f"level {level} is int({mult} * model_channels={self.model_channels}) = "
                    f"{width} channels wide; GroupNorm(32) needs a positive multiple of 32"
                )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.image_size is not None and (not _is_int(self.image_size) or self.image_size < 1):
            raise ValueError(f"image_size must be None or a positive int, got {self.image_size!r}")
        _compute_dtype(self.dtype)
        plan = self.plan()
        per_head = max(self.num_head_channels, 1)  # -1: any width per head
        for block in (*plan.input_blocks, plan.middle_block, *plan.output_blocks):
            width = 0  # every attention layer follows the ResBlock that sets its width
            for layer in block:
                if layer.kind == "res":
                    width = layer.channels
                elif layer.kind == "attn" and (
                    layer.heads < 1 or width % layer.heads or width % per_head
                ):
                    raise ValueError(
                        f"an attention layer of {width} channels cannot be split into heads "
                        f"(num_heads={self.num_heads}, num_head_channels="
                        f"{self.num_head_channels}, num_heads_upsample={self.num_heads_upsample}"
                        "): the head count and the width per head must divide the width"
                    )

    # ------------------------------------------------------------------ structure

    def _heads(self, channels: int, upsample: bool = False) -> int:
        if self.num_head_channels != -1:
            return channels // self.num_head_channels
        if upsample and self.num_heads_upsample != -1:
            return self.num_heads_upsample
        return self.num_heads

    def plan(self) -> Plan:
        """The network's layers, level by level (the encoder has no output blocks)."""
        return build_plan(
            self.model_channels,
            self.channel_mult,
            self.num_res_blocks,
            self.attention_resolutions,
            self._heads,
            self.resblock_updown,
            with_output=isinstance(self, UNetModel),
        )

    def _options(self, dtype) -> BlockOptions:
        flags = (self.use_scale_shift_norm, self.conv_resample, self.use_new_attention_order)
        return BlockOptions(float(self.dropout), *flags, dtype, bool(self.remat))

    def config(self) -> dict[str, Any]:
        """The reference options as a JSON-ready dict (``openai_model_from_config`` inverts it)."""
        fields = UNET_FIELDS if isinstance(self, UNetModel) else ENCODER_FIELDS
        values = {name: getattr(self, name) for name in fields}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}

    # ------------------------------------------------------------------ forward parts

    def _check_image(self, x, channels: int, what: str = "x") -> None:
        if x.ndim != 4:
            raise ValueError(f"{what} must be [B, H, W, C] (channels last), got shape {x.shape}")
        if x.shape[-1] != channels:
            raise ValueError(
                f"{what} has {x.shape[-1]} channels (last axis) but the network expects "
                f"{channels}; got shape {x.shape} (jaxdiff is channels-last: NHWC, not NCHW)"
            )
        factor = self.plan().downsample_factor
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(
                f"image size {x.shape[1]}x{x.shape[2]} must be divisible by {factor} = "
                f"2 ** (len(channel_mult) - 1) for channel_mult={self.channel_mult}"
            )

    @staticmethod
    def _check_time(t, batch: int) -> jax.Array:
        if t.shape not in ((), (batch,)):
            raise ValueError(f"t must be [B] = [{batch}] or a scalar, got shape {t.shape}")
        return jnp.broadcast_to(t, (batch,))

    def _time_embedding(self, t):
        """``Linear -> SiLU -> Linear`` of the sinusoidal embedding, float32 [B, 4 mc]."""
        mc = self.model_channels
        emb = timestep_embedding(t, mc)
        emb = _dense(4 * mc, mc, "time_embed_0", jnp.float32)(emb)
        return _dense(4 * mc, 4 * mc, "time_embed_2", jnp.float32)(nn.silu(emb))

    def _down(self, h, emb, options, train, features=None):
        """The input blocks and the middle block; the input blocks' outputs (the skips), and
        with ``features`` each block's spatial mean in float32 appended to it."""
        plan = self.plan()
        skips = []
        for i, layers in enumerate(plan.input_blocks):
            h = EmbedSequential(layers, options, name=f"input_blocks_{i}")(h, emb, train)
            skips.append(h)
            if features is not None:
                features.append(jnp.mean(h.astype(jnp.float32), axis=(1, 2)))
        h = EmbedSequential(plan.middle_block, options, name="middle_block")(h, emb, train)
        if features is not None:
            features.append(jnp.mean(h.astype(jnp.float32), axis=(1, 2)))
        return h, skips


class UNetModel(_OpenAIBase):
    """openai's ``UNetModel`` (improved-diffusion and guided-diffusion) in Flax, NHWC.

    Call as ``model.apply(variables, x, t, y, train=..., rngs={"dropout": key})``;
    ``lambda x, t, **cond: model.apply(variables, x, t, **cond)`` is a jaxdiff ``model_fn``.

    Attributes (the references' constructor arguments, same names and defaults):
      in_channels, model_channels, out_channels: image channels in, base width, channels out
        (``2 * in_channels`` for a learned-sigma model: eps and the variance interpolation).
      num_res_blocks: ResBlocks per level on the way down (one more on the way up).
      attention_resolutions: the down-sampling rates with self-attention, as in the references
        (``image_size // resolution`` for each resolution of the scripts' flag); any collection.
      dropout: in every ResBlock before its last conv (only with ``train``).
      channel_mult: width of each level in units of ``model_channels`` (floats allowed, as
        guided's 512 px ``(0.5, 1, ...)``: the width is ``int(mult * model_channels)``); every
        width must be a multiple of 32 (GroupNorm(32)).
      conv_resample: learned 3x3 convolutions in the up/down-sampling layers.
      dims: 2 only (a ValueError otherwise).
      num_classes: class-conditional with that many classes (``y`` required).
      num_heads / num_head_channels: heads per attention layer, or a fixed width per head
        (which overrides both head counts); num_heads_upsample: heads on the way up (-1: as
        num_heads).
      use_scale_shift_norm: FiLM-like ``norm(h) (1 + scale) + shift`` in the ResBlocks.
      resblock_updown: up/down-sample with ResBlocks instead of Upsample/Downsample.
      use_new_attention_order: qkv channels as [q | k | v] split into heads
        (``QKVAttention``) instead of per-head [q | k | v] (``QKVAttentionLegacy``).
      image_size: guided-diffusion's first argument; unused by this network (any H, W divisible
        by ``2 ** (len(channel_mult) - 1)`` work).
      layout: "guided" (every option) or "improved" (improved-diffusion's UNetModel: refuses
        the options it lacks and ``channel_mult[0] != 1``).

    Execution options:
      remat: recompute every ResBlock's and attention block's activations in the backward pass
        instead of storing them (``flax.linen.remat``; the references' ``use_checkpoint``):
        less memory for more compute, the same numbers.
      dtype: the torso's compute dtype, e.g. ``"bfloat16"`` (jaxdiff's counterpart of the
        references' ``use_fp16``): the input, middle and output blocks' convolutions and
        attention products run in it; GroupNorm and the softmax compute in float32; the time
        and class embeddings, the ResBlocks' embedding projections and the output head stay
        float32, as in the references' float16 mode. None: the dtype of the floating
        parameters passed to ``apply`` (float32 unless they were cast). Output: float32.
    """

    num_classes: int | None = None
    layout: str = "guided"

    def _validate(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.num_classes is not None and (not _is_int(self.num_classes) or self.num_classes < 1):
            raise ValueError(
                f"num_classes must be None or a positive int, got {self.num_classes!r}"
            )
        if self.layout == "improved":
            refused = {
                "num_head_channels": self.num_head_channels != -1,
                "resblock_updown": self.resblock_updown,
                "use_new_attention_order": self.use_new_attention_order,
            }
            bad = [name for name, on in refused.items() if on]
            if bad:
                raise ValueError(
                    f"{', '.join(bad)} {'is' if len(bad) == 1 else 'are'} not an option of "
                    "improved-diffusion's UNetModel; use layout='guided' (guided-diffusion's "
                    "UNetModel has them) or leave them at their defaults"
                )
            mults = self.channel_mult
            if mults and (mults[0] != 1 or not all(_is_int(m) for m in mults)):
                raise ValueError(
                    f"layout='improved' needs integer channel_mult starting at 1, got {mults!r}: "
                    "improved-diffusion's UNetModel cannot run other values (its output "
                    "convolution expects model_channels inputs); use layout='guided'"
                )
        super()._validate()

    @property
    def input_channels(self) -> int:
        """Channels of the first convolution's input."""
        return self.in_channels

    def _check_label(self, y, batch: int):
        if self.num_classes is None:
            if y is not None:
                raise ValueError(
                    "y was given but the network has num_classes=None; build it with "
                    "num_classes or drop y"
                )
            return None
        if y is None:
            raise ValueError(
                f"the network is class-conditional (num_classes={self.num_classes}): pass y, "
                "an integer array [B] of labels"
            )
        if not isinstance(y, jax.core.Tracer):
            # read concrete labels on the host: jnp.min would be staged inside a caller's scan
            host = np.asarray(y)
            if host.shape != (batch,) or not np.issubdtype(host.dtype, np.integer):
                raise ValueError(
                    f"y must be an integer array [B] = [{batch}], got {host.dtype}{host.shape}"
                )
            low, high = int(host.min()), int(host.max())
            if low < 0 or high >= self.num_classes:
                raise ValueError(
                    f"y values must be in [0, {self.num_classes}), got min {low}, max {high}"
                )
        y = jnp.asarray(y)
        if y.shape != (batch,) or not jnp.issubdtype(y.dtype, jnp.integer):
            raise ValueError(f"y must be an integer array [B] = [{batch}], got {y.dtype}{y.shape}")
        return y

    def _forward(self, x, t, y, train: bool):
        """The network on its (already concatenated) input x [B, H, W, input_channels]."""
        dtype = _apply_dtype(self.dtype, self.variables)
        self._check_image(x, self.input_channels)
        batch = x.shape[0]
        t = self._check_time(jnp.asarray(t), batch)
        y = self._check_label(y, batch)
        emb = self._time_embedding(t)
        if y is not None:
            label_emb = nn.Embed(
                self.num_classes,
                4 * self.model_channels,
                dtype=jnp.float32,
                embedding_init=nn.initializers.normal(1.0),  # torch.nn.Embedding's
                name="label_emb",
            )
            emb = emb + label_emb(y)
        options = self._options(dtype)
        h = jnp.asarray(x, jnp.float32).astype(dtype)
        h, skips = self._down(h, emb, options, train)
        for i, layers in enumerate(self.plan().output_blocks):
            h = jnp.concatenate([h, skips.pop()], axis=-1)
            h = EmbedSequential(layers, options, name=f"output_blocks_{i}")(h, emb, train)
        h = nn.silu(GroupNorm32(name="out_0")(h.astype(jnp.float32)))
        width = _width(self.channel_mult[0], self.model_channels)
        return _conv(self.out_channels, width, "out_2", jnp.float32, zero=True)(h)

    @nn.compact
    def __call__(
        self, x: jax.Array, t: jax.Array, y: jax.Array | None = None, train: bool = False
    ) -> jax.Array:
        """The network output [B, H, W, out_channels] (float32).

        Args:
          x: the noisy image [B, H, W, in_channels], channels last.
          t: [B] (or a scalar), the references' timestep input (the step index, or its
            rescaled value with ``rescale_timesteps``); any float or int.
          y: [B] integer class labels, required exactly when ``num_classes`` is set.
          train: enables dropout, drawn from the ``'dropout'`` rng collection.
        """
        return self._forward(x, t, y, train)


class SuperResModel(UNetModel):
    """openai's ``SuperResModel``: a UNetModel whose input is ``concat(x, upsampled)`` with the
    low-resolution image bilinearly resized to x's size (PyTorch's ``F.interpolate(...,
    mode="bilinear")``, ``align_corners=False``). ``in_channels`` is the image's channel count,
    as in the references (the first convolution sees ``2 * in_channels``).

    Call as ``model.apply(variables, x, t, y, low_res=low_res)``; ``low_res`` is [B, h, w,
    in_channels], channels last (a jaxdiff ``model_fn`` condition).
    """

    @property
    def input_channels(self) -> int:
        return 2 * self.in_channels

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        y: jax.Array | None = None,
        train: bool = False,
        *,
        low_res: jax.Array | None = None,
    ) -> jax.Array:
        """The network output [B, H, W, out_channels] for x [B, H, W, in_channels] and the
        low-resolution image ``low_res`` [B, h, w, in_channels] (required)."""
        if low_res is None:
            raise ValueError("SuperResModel needs low_res=, the low-resolution image [B, h, w, C]")
        x, low_res = jnp.asarray(x, jnp.float32), jnp.asarray(low_res, jnp.float32)
        self._check_image(x, self.in_channels)
        if low_res.ndim != 4 or low_res.shape[0] != x.shape[0] or low_res.shape[-1] != x.shape[-1]:
            raise ValueError(
                f"low_res must be [B, h, w, C] = [{x.shape[0]}, h, w, {x.shape[-1]}] (channels "
                f"last), got shape {low_res.shape}"
            )
        upsampled = resize_bilinear(low_res, x.shape[1:3])
        return self._forward(jnp.concatenate([x, upsampled], axis=-1), t, y, train)


class EncoderUNetModel(_OpenAIBase):
    """guided-diffusion's ``EncoderUNetModel`` (the noisy classifier): the UNetModel's input and
    middle blocks, then a pooling head to ``out_channels`` logits [B, out_channels] (float32).

    Same attributes as :class:`UNetModel` (without ``num_classes`` and ``layout``;
    ``num_heads_upsample`` is accepted and unused, as in the reference), plus ``pool``:

    * "adaptive": GroupNorm, SiLU, the spatial mean, a zero-initialised 1x1 convolution;
    * "attention": GroupNorm, SiLU, ``AttentionPool2d`` with ``num_head_channels`` per head
      (required) and a positional embedding for ``image_size // 2 ** (levels - 1)`` squared
      pixels: needs ``image_size`` and inputs of that size;
    * "spatial": the spatial mean of every input block's and the middle block's output,
      concatenated, then ``Linear(2048) -> ReLU -> Linear``;
    * "spatial_v2": the same features, ``Linear(2048) -> GroupNorm(32) -> SiLU -> Linear``.

    Call as ``model.apply(variables, x, t, train=...)``.
    """

    pool: str = "adaptive"

    def _validate(self) -> None:
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
        if self.pool == "attention":
            if self.num_head_channels == -1:
                raise ValueError("pool='attention' needs num_head_channels (the width per head)")
            if self.image_size is None:
                raise ValueError(
                    "pool='attention' needs image_size: its positional embedding has one entry "
                    "per pixel of the (image_size // 2 ** (levels - 1)) squared bottom map"
                )
        super()._validate()
        plan = self.plan()
        if self.pool == "attention" and (
            plan.bottom_channels % self.num_head_channels
            or self.image_size < plan.downsample_factor
        ):
            raise ValueError(
                f"pool='attention' needs num_head_channels={self.num_head_channels} to divide "
                f"the bottom width {plan.bottom_channels} and image_size={self.image_size} >= "
                f"{plan.downsample_factor} = 2 ** (len(channel_mult) - 1)"
            )

    @property
    def feature_size(self) -> int:
        """Width of the "spatial" pools' features: every input block's and the middle's."""
        plan = self.plan()
        return sum(plan.skip_channels) + plan.bottom_channels

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, train: bool = False) -> jax.Array:
        """Logits [B, out_channels] for the noisy image x [B, H, W, in_channels] at t [B]."""
        dtype = _apply_dtype(self.dtype, self.variables)
        x = jnp.asarray(x, jnp.float32)
        self._check_image(x, self.in_channels)
        plan = self.plan()
        if self.pool == "attention":
            side = self.image_size // plan.downsample_factor
            if x.shape[1] // plan.downsample_factor != side or x.shape[2] != x.shape[1]:
                raise ValueError(
                    f"pool='attention' was built for image_size={self.image_size} (a "
                    f"{side}x{side} bottom map); got an image of {x.shape[1]}x{x.shape[2]}"
                )
        t = self._check_time(jnp.asarray(t), x.shape[0])
        emb = self._time_embedding(t)
        spatial = self.pool.startswith("spatial")
        features = [] if spatial else None
        h, _ = self._down(x.astype(dtype), emb, self._options(dtype), train, features)
        if spatial:
            h = jnp.concatenate(features, axis=-1)
            h = _dense(SPATIAL_HIDDEN, self.feature_size, "out_0", jnp.float32)(h)
            if self.pool == "spatial":
                h = nn.relu(h)
                return _dense(self.out_channels, SPATIAL_HIDDEN, "out_2", jnp.float32)(h)
            h = nn.silu(GroupNorm32(name="out_1")(h))
            return _dense(self.out_channels, SPATIAL_HIDDEN, "out_3", jnp.float32)(h)
        ch = plan.bottom_channels
        h = nn.silu(GroupNorm32(name="out_0")(h.astype(jnp.float32)))
        if self.pool == "adaptive":
            h = jnp.mean(h, axis=(1, 2), keepdims=True)
            conv = _conv(self.out_channels, ch, "out_3", jnp.float32, size=1, zero=True)
            return conv(h).reshape(h.shape[0], self.out_channels)
        side = self.image_size // plan.downsample_factor
        pool = AttentionPool2d(side, self.num_head_channels, self.out_channels, name="out_2")
        return pool(h)


_MODELS = {
    "UNetModel": UNetModel,
    "SuperResModel": SuperResModel,
    "EncoderUNetModel": EncoderUNetModel,
}


def openai_model_from_config(
    config: Mapping[str, Any], model: str = "UNetModel", **options
) -> UNetModel | SuperResModel | EncoderUNetModel:
    """A network from the references' constructor arguments (as ``script_util`` passes them).

    ``model`` is "UNetModel", "SuperResModel" or "EncoderUNetModel". The references' execution
    flags are accepted: ``use_checkpoint=True`` becomes ``remat=True`` (recomputation in the
    backward pass; no number changes) and ``use_fp16=True`` becomes ``dtype="bfloat16"``, unless
    ``options`` gives them. ``options`` are ``dtype``, ``remat`` and, for the UNets, ``layout``
    ("guided" or "improved"). Unknown keys raise a
    ValueError naming them; lists become tuples.
    """
    if model not in _MODELS:
        raise ValueError(f"model must be one of {sorted(_MODELS)}, got {model!r}")
    if not isinstance(config, Mapping):
        raise ValueError(f"an openai model config must be a mapping, got {type(config).__name__}")
    cls = _MODELS[model]
    fields = ENCODER_FIELDS if cls is EncoderUNetModel else UNET_FIELDS
    config = dict(config)
    if config.pop("use_checkpoint", False) and "remat" not in options:
        options["remat"] = True
    use_fp16 = bool(config.pop("use_fp16", False))
    allowed_options = {"dtype", "remat"} | ({"layout"} if cls is not EncoderUNetModel else set())
    unknown = sorted((set(config) - set(fields)) | (set(options) - allowed_options))
    if unknown:
        raise ValueError(
            f"unknown {model} option(s) {unknown}; the options are {', '.join(fields)}, "
            f"use_checkpoint, use_fp16 and {', '.join(sorted(allowed_options))}"
        )
    if use_fp16 and options.get("dtype") is None:
        options["dtype"] = "bfloat16"
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    return cls(**kwargs, **options)
