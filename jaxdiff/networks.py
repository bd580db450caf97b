"""The network a run's configuration builds: jaxdiff's lucid ``Unet`` (its class-conditional
variant with ``num_classes``) or openai's ``UNetModel`` (``arch="openai"``), with the image
channels the data has."""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxdiff import data
from jaxdiff.config import Config, DataConfig
from jaxdiff.models import Unet

__all__ = ["LabelledUNetModel", "build_model", "build_openai_model", "num_channels"]


def num_channels(cfg: DataConfig) -> int:
    """The run's channel count: 1 for digits, else ``cfg.channels`` or, when that is None, the
    folder's (see :func:`resolve_channels`)."""
    if cfg.dataset == "digits":
        return 1
    if cfg.channels is None:
        return data.ImageFolder(cfg.folder, cfg.image_size, channels=None).channels
    return cfg.channels


@dataclasses.dataclass(frozen=True)
class LabelledUNetModel:
    """openai's ``UNetModel`` with the batch's ``label`` as its class input ``y`` (jaxdiff's
    networks take their conditioning as ``label=``); ``init`` and ``apply`` as the module's."""

    net: Any

    def init(self, rngs, x, t, label=None, **kwargs):
        return self.net.init(rngs, x, t, label, **kwargs)

    def apply(self, variables, x, t, label=None, **kwargs):
        return self.net.apply(variables, x, t, label, **kwargs)


def build_openai_model(config: Config) -> LabelledUNetModel:
    """openai's ``UNetModel`` of an ``arch="openai"`` run (see :class:`ModelConfig`)."""
    from jaxdiff.models.openai_unet import UNetModel

    m, d = config.model, config.diffusion
    channels = num_channels(config.data)
    learned = d.var_type in ("learned", "learned_range")
    return LabelledUNetModel(
        UNetModel(
            in_channels=channels,
            model_channels=m.dim,
            out_channels=2 * channels if learned else channels,
            num_res_blocks=m.num_res_blocks,
            # script_util's conversion: a size in pixels to the level's down-sampling rate
            attention_resolutions=tuple(
                config.data.image_size // r for r in m.attention_resolutions
            ),
            dropout=m.dropout,
            channel_mult=tuple(m.dim_mults),
            num_classes=m.num_classes,
            num_heads=m.num_heads,
            num_head_channels=m.num_head_channels,
            use_scale_shift_norm=m.use_scale_shift_norm,
            resblock_updown=m.resblock_updown,
            use_new_attention_order=m.use_new_attention_order,
            image_size=config.data.image_size,
            dtype=None if m.dtype == "float32" else m.dtype,
            remat=m.remat,
        )
    )


def build_model(config: Config):
    """The run's network: jaxdiff's ``Unet``, or its ``ClassConditionalUnet`` when
    ``model.num_classes`` is set, or openai's ``UNetModel`` with ``arch="openai"``; a learned
    variance doubles the output channels."""
    m, d = config.model, config.diffusion
    if m.arch == "openai":
        return build_openai_model(config)
    common = dict(
        dim=m.dim,
        dim_mults=tuple(m.dim_mults),
        channels=num_channels(config.data),
        learned_variance=d.var_type in ("learned", "learned_range"),
        learned_sinusoidal_cond=m.learned_sinusoidal_cond,
        random_fourier_features=m.random_fourier_features,
        learned_sinusoidal_dim=m.learned_sinusoidal_dim,
        attn_heads=m.attn_heads,
        attn_dim_head=m.attn_dim_head,
        dtype=None if m.dtype == "float32" else m.dtype,
        remat=m.remat,
    )
    if m.num_classes is not None:
        from jaxdiff.models import ClassConditionalUnet

        return ClassConditionalUnet(
            num_classes=m.num_classes, cond_drop_prob=m.cond_drop_prob, **common
        )
    return Unet(
        dropout=m.dropout, num_mem_kv=m.num_mem_kv, self_condition=m.self_condition, **common
    )
