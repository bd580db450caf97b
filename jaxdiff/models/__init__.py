"""Networks for jaxdiff. The diffusion core never imports these: it sees a ``model_fn``."""

from jaxdiff.guidance import guided_output
from jaxdiff.models.cfg_unet import (
    CFG_PRESETS,
    NULL_LABEL,
    ClassConditionalUnet,
    cfg_unet_from_config,
)
from jaxdiff.models.inception import InceptionOutputs, InceptionV3FID, load_inception_variables
from jaxdiff.models.openai_unet import (
    EncoderUNetModel,
    SuperResModel,
    UNetModel,
    openai_model_from_config,
)
from jaxdiff.models.unet import PRESETS, Unet, unet_from_config

__all__ = [
    "CFG_PRESETS",
    "NULL_LABEL",
    "PRESETS",
    "SuperResModel",
    "UNetModel",
    "ClassConditionalUnet",
    "EncoderUNetModel",
    "InceptionOutputs",
    "InceptionV3FID",
    "Unet",
    "cfg_unet_from_config",
    "guided_output",
    "load_inception_variables",
    "openai_model_from_config",
    "unet_from_config",
]
