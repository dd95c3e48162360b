"""SDXL models: `build_sdxl(preset)` for fresh models, `load_sdxl(path_or_id)` for weights.

Both return an `SDXLModels` with the four cells kohya's scripts pass around:
`text_encoder1`, `text_encoder2`, `vae`, `unet`.
"""

from library.models.checkpoint import load as load_sdxl
from library.models.sdxl import SDXLModels, build_sdxl

__all__ = ["SDXLModels", "build_sdxl", "load_sdxl"]
