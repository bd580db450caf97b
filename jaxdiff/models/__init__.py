"""Networks for jaxdiff. The diffusion core never imports these: it sees a ``model_fn``."""

from jaxdiff.models.inception import InceptionOutputs, InceptionV3FID, load_inception_variables
from jaxdiff.models.unet import PRESETS, Unet, unet_from_config

__all__ = [
    "PRESETS",
    "InceptionOutputs",
    "InceptionV3FID",
    "Unet",
    "load_inception_variables",
    "unet_from_config",
]
