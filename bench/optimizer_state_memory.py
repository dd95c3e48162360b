"""Optimizer state of an SDXL LoRA: float32 (what runs here) against bitsandbytes' 8-bit
block-wise state (what kohya's AdamW8bit/Lion8bit keep), per network_dim. Pure arithmetic over
the module list kohya writes for SDXL (tests/fixtures/kohya_sdxl_lora_keys_conv_dim.tsv, rank 4
shapes), so it needs no model and runs in a second:

    python bench/optimizer_state_memory.py

AdamW keeps two moments per parameter, Lion one. 32-bit state: 4 bytes per moment and element.
8-bit: 1 byte per moment and element plus a float32 absmax per block of 2048 elements (the
block-wise scheme of Dettmers et al., "8-bit Optimizers via Block-wise Quantization").
"""

import math
import os

KEYS = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures",
                    "kohya_sdxl_lora_keys_conv_dim.tsv")
BLOCK = 2048
MIB = 2 ** 20


def modules():
    """{module: (elements of lora_down per rank, elements of lora_up per rank)}."""
    out = {}
    with open(KEYS) as f:
        next(f)
        for line in f:
            key, shape, _ = line.rstrip("\n").split("\t")
            name, _, role = key.partition(".")
            dims = [int(x) for x in shape.strip("()").split(",") if x.strip()]
            if role == "lora_down.weight":      # (rank, in, [kh, kw])
                out.setdefault(name, [0, 0])[0] = math.prod(dims[1:])
            elif role == "lora_up.weight":      # (out, rank, [1, 1])
                out.setdefault(name, [0, 0])[1] = dims[0]
    return out


def is_conv_dim_module(name):
    """kohya adds ResBlocks, down- and upsamplers only with conv_dim; without it the UNet's LoRA
    covers the transformers (attention, feed-forward, proj_in/out)."""
    return name.startswith("lora_unet_") and not any(
        part in name for part in ("_transformer_blocks_", "_proj_in", "_proj_out"))


def main():
    mods = modules()
    print("| network_dim | conv_dim | modules | LoRA parameters | AdamW state 32-bit | "
          "AdamW state 8-bit | saved | Lion saved |")
    print("|---|---|---|---|---|---|---|---|")
    for dim, conv in ((8, False), (16, False), (32, False), (32, True), (64, False), (128, False)):
        chosen = [v for k, v in mods.items() if conv or not is_conv_dim_module(k)]
        params = sum((d + u) * dim for d, u in chosen)
        fp32 = 2 * 4 * params
        q8 = 2 * (params + 4 * math.ceil(params / BLOCK))
        print(f"| {dim} | {dim if conv else '-'} | {len(chosen)} | {params / 1e6:.1f} M | "
              f"{fp32 / MIB:.0f} MiB | {q8 / MIB:.0f} MiB | {(fp32 - q8) / MIB:.0f} MiB | "
              f"{(fp32 - q8) / 2 / MIB:.0f} MiB |")


if __name__ == "__main__":
    main()
