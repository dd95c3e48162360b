"""kohya's LoRA module names for SDXL: the prefixes, the classes whose layers get a LoRA, the
`lora_unet_<module path with _>` name of each, and kohya's block index of a UNet name (for
block dims and block LR weights). Plain Python.
"""

UNET_PREFIX = "lora_unet"
TE_PREFIXES = ("lora_te1", "lora_te2")
SD1_TE_PREFIX = "lora_te"

# Our classes for kohya's class-name target lists (lora.py:862-875):
#   Transformer2DModel -> SpatialTransformer; ResnetBlock2D -> ResBlock;
#   Downsample2D / Upsample2D -> Downsample / Upsample; CLIPAttention, CLIPMLP -> same names.
UNET_TARGET_CLASSES = ("SpatialTransformer",)
UNET_TARGET_CLASSES_CONV2D_3X3 = ("ResBlock", "Downsample", "Upsample")
TEXT_ENCODER_TARGET_CLASSES = ("CLIPAttention", "CLIPMLP")


def lora_name_for(prefix, module_path, child_path):
    return f"{prefix}.{module_path}.{child_path}".replace(".", "_")


def get_block_index(lora_name):
    """kohya's SDXL block index (0..22) of a UNet LoRA name; -1 for anything else."""
    if not lora_name.startswith(UNET_PREFIX + "_"):
        return -1
    name = lora_name[len(UNET_PREFIX) + 1:]
    if name.startswith(("time_embed_", "label_emb_")):
        return 0
    if name.startswith("input_blocks_"):
        return 1 + int(name.split("_")[2])
    if name.startswith("middle_block_"):
        return 10 + int(name.split("_")[2])
    if name.startswith("output_blocks_"):
        return 13 + int(name.split("_")[2])
    if name.startswith("out_"):
        return 22
    return -1
