"""Networks for jaxdiff. The diffusion core never imports these: it sees a ``model_fn``."""

from jaxdiff.models.unet import PRESETS, Unet, unet_from_config

__all__ = ["PRESETS", "Unet", "unet_from_config"]
