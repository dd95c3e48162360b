#!/usr/bin/env python
"""Make SDXL LoRA files the way diffusers writes them, for tests/test_lora_files.py.

Runs ONLY in a scratch venv with torch, diffusers, transformers and peft (like
tools/make_reference_fixtures.py, whose model builders it uses; none of these is a dependency of
the project). Run it once per transformers major version: transformers 5 dropped
CLIPTextModel's `text_model.` level, so diffusers 0.42 writes the text encoders' keys as
`text_encoder.encoder.layers.N...` under transformers 5 and `text_encoder.text_model.encoder.
layers.N...` under transformers 4.

    <scratch venv>/bin/python tools/make_diffusers_lora_fixtures.py --out tests/fixtures/diffusers_lora

writes `tiny_transformers<major>.safetensors`: a rank-4 LoRA of the tiny SDXL preset's UNet
attention queries and both text encoders' attention, saved as diffusers' SDXL DreamBooth LoRA script
saves it (the peft adapters' state dict -> convert_state_dict_to_diffusers ->
StableDiffusionXLPipeline.save_lora_weights). The adapters are injected with peft directly:
transformers 5's own `add_adapter` wants a peft newer than the package index has. Every LoRA factor gets seeded random values that
depend only on its module name without `text_model.`, so the files of both versions hold the
same LoRA in their two spellings.
"""

import argparse
import hashlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_reference_fixtures as ref  # noqa: E402  (its builders; imports torch and diffusers)

import torch  # noqa: E402
import transformers  # noqa: E402
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel  # noqa: E402
from diffusers.utils import convert_state_dict_to_diffusers  # noqa: E402
from peft import LoraConfig, inject_adapter_in_model  # noqa: E402
from transformers import CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

RANK = 4


def fill(model):
    """Seeded values for every LoRA factor, keyed by its name without `text_model.`."""
    for name, p in model.named_parameters():
        if "lora_" in name:
            key = name.replace("text_model.", "")
            g = torch.Generator().manual_seed(int(hashlib.sha256(key.encode()).hexdigest()[:8], 16))
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def lora_state_dict(model):
    """peft's state dict of the injected adapter: `<module>.lora_A.weight` / `.lora_B.weight`
    (what get_peft_model_state_dict returns for a model with one adapter)."""
    return {k.replace(".default.", "."): v for k, v in model.state_dict().items() if "lora_" in k}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    args = p.parse_args()
    cfg = ref.TINY
    unet = UNet2DConditionModel(**ref.unet_config(cfg))
    te1 = CLIPTextModel(ref.clip_config(cfg.text_encoder1, pad_token_id=ref.EOS))
    te2 = CLIPTextModelWithProjection(ref.clip_config(cfg.text_encoder2, pad_token_id=0))
    unet = inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian",
                                              target_modules=["to_q"]), unet)
    te_config = LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian",
                           target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
    te1 = inject_adapter_in_model(te_config, te1)
    te2 = inject_adapter_in_model(te_config, te2)
    for model in (unet, te1, te2):
        fill(model)
    os.makedirs(args.out, exist_ok=True)
    name = f"tiny_transformers{transformers.__version__.split('.')[0]}.safetensors"
    StableDiffusionXLPipeline.save_lora_weights(
        args.out, weight_name=name,
        unet_lora_layers=convert_state_dict_to_diffusers(lora_state_dict(unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(lora_state_dict(te1)),
        text_encoder_2_lora_layers=convert_state_dict_to_diffusers(lora_state_dict(te2)))
    print(f"wrote {os.path.join(args.out, name)} (diffusers {ref.diffusers.__version__}, "
          f"transformers {transformers.__version__})")


if __name__ == "__main__":
    main()
