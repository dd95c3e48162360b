"""SDXL models: `build_sdxl(preset)` for fresh models, `load_sdxl(path_or_id)` for weights.

Both return an `SDXLModels` with the four cells kohya's scripts pass around:
`text_encoder1`, `text_encoder2`, `vae`, `unet`.

    config.py            the presets (sdxl_base; tiny for tests and the demo; medium for benches)
    unet.py, clip.py, vae.py   the models, named like the checkpoint's keys (SGM, HF, LDM)
    sdxl.py              SDXLModels and build_sdxl
    keymaps.py           diffusers <-> single-file key maps (the LoRA key styles use them too)
    diffusers_config.py  the config files of a diffusers folder, made from a preset
    checkpoint.py        loading and saving: single files, diffusers folders, hub ids
"""

from library.models.checkpoint import load as load_sdxl
from library.models.sdxl import SDXLModels, build_sdxl

__all__ = ["SDXLModels", "build_sdxl", "load_sdxl"]
