"""The four SDXL cells kohya's scripts pass around, and building them from a preset."""

import math
from dataclasses import dataclass, field
from typing import Optional

from mindspore import nn
from mindspore.nn.utils import no_init_parameters

from library import layers
from library.models.clip import CLIPTextModel
from library.models.config import SDXLConfig, get_preset
from library.models.unet import SDXLUNet
from library.models.vae import AutoencoderKL


@dataclass
class SDXLModels:
    config: SDXLConfig
    text_encoder1: nn.Cell
    text_encoder2: nn.Cell
    vae: nn.Cell
    unet: nn.Cell
    # OpenCLIP's logit_scale lives in the checkpoint but no text model uses it; kept to save back.
    te2_logit_scale: float = math.log(100.0)
    source: Optional[str] = field(default=None)   # the file or folder the weights came from


def build_sdxl(preset="sdxl_base", init=True):
    """Build the four models of a preset. `init=False` skips random initialisation (about a
    second for full-size SDXL instead of half a minute): the weights are loaded afterwards."""
    cfg = get_preset(preset)

    def build():
        return SDXLModels(config=cfg,
                          text_encoder1=CLIPTextModel(cfg.text_encoder1),
                          text_encoder2=CLIPTextModel(cfg.text_encoder2),
                          vae=AutoencoderKL(cfg.vae),
                          unet=SDXLUNet(cfg.unet))

    if init:
        models = build()
    else:
        with no_init_parameters():
            models = build()
    # Parameter names must be unique within a compiled graph, and both text encoders use the
    # same module paths: prefix every name with its component (module paths stay as they are).
    for component in ("text_encoder1", "text_encoder2", "vae", "unet"):
        getattr(models, component).update_parameters_name(component + ".")
        layers.check_parameter_names_once(getattr(models, component))
    return models
