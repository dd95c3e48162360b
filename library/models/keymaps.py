"""Name maps between our module trees and the two file layouts SDXL weights come in.

Pure Python: a map takes one of our parameter names and returns where that tensor lives in a
file, as a `Place(key, part, transpose, as_conv)`:
  - `part` i of 3: the tensor is the i-th third (along axis 0) of a fused q/k/v tensor (OpenCLIP);
  - `transpose`: the file stores the matrix transposed (TE2's text_projection, Stability's P);
  - `reshape`: the file stores our 1x1 conv kernel (C, C, 1, 1) as a Linear weight (C, C)
    (the VAE's mid-block attention in diffusers).
Loading inverts the map over the model's own names, so strictness (every key used, every
parameter filled) falls out of it.
"""

import re
from typing import NamedTuple, Optional

SINGLE_FILE_PREFIXES = {
    "unet": "model.diffusion_model.",
    "text_encoder1": "conditioner.embedders.0.transformer.",
    "text_encoder2": "conditioner.embedders.1.model.",
    "vae": "first_stage_model.",
}
# Tensors some files carry that no model here uses: tolerated, never required.
IGNORED_KEYS = ("conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
                "text_model.embeddings.position_ids")
TE2_LOGIT_SCALE_KEY = "conditioner.embedders.1.model.logit_scale"


class Place(NamedTuple):
    key: str
    part: Optional[int] = None
    transpose: bool = False
    reshape: bool = False


# --- single file ----------------------------------------------------------------------------

_OPENCLIP_LAYER = [("self_attn.out_proj.", "attn.out_proj."), ("layer_norm1.", "ln_1."),
                   ("layer_norm2.", "ln_2."), ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj.")]


def _te2_openclip_place(name):
    if name == "text_projection.weight":
        return Place("text_projection", transpose=True)
    if name == "text_model.embeddings.token_embedding.weight":
        return Place("token_embedding.weight")
    if name == "text_model.embeddings.position_embedding.weight":
        return Place("positional_embedding")
    if name.startswith("text_model.final_layer_norm."):
        return Place("ln_final." + name.rsplit(".", 1)[1])
    m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)", name)
    if m is None:
        raise KeyError(name)
    block, rest = f"transformer.resblocks.{m.group(1)}.", m.group(2)
    qkv = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
    if qkv:
        return Place(f"{block}attn.in_proj_{qkv.group(2)}", part="qkv".index(qkv.group(1)))
    for ours, theirs in _OPENCLIP_LAYER:
        if rest.startswith(ours):
            return Place(block + theirs + rest[len(ours):])
    raise KeyError(name)


def single_file_place(component, name):
    """Where parameter `name` of `component` lives in an SGM single-file checkpoint."""
    prefix = SINGLE_FILE_PREFIXES[component]
    if component == "text_encoder2":
        p = _te2_openclip_place(name)
        return p._replace(key=prefix + p.key)
    return Place(prefix + name)


# --- diffusers folder ------------------------------------------------------------------------

DIFFUSERS_FOLDERS = {"unet": "unet", "text_encoder1": "text_encoder",
                     "text_encoder2": "text_encoder_2", "vae": "vae"}
DIFFUSERS_WEIGHT_FILES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
                          "text_encoder1": "model", "text_encoder2": "model"}

_RESNET = [("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("out_layers.0.", "norm2."),
           ("out_layers.3.", "conv2."), ("emb_layers.1.", "time_emb_proj."),
           ("skip_connection.", "conv_shortcut.")]


def unet_block_prefixes(unet_cfg):
    """(SGM prefix, diffusers prefix) pairs for the UNet's blocks (kohya's conversion table,
    generalised to any number of levels and res blocks)."""
    n_levels, n_res = len(unet_cfg.channel_mult), unet_cfg.num_res_blocks
    pairs = [("time_embed.0.", "time_embedding.linear_1."),
             ("time_embed.2.", "time_embedding.linear_2."),
             ("label_emb.0.0.", "add_embedding.linear_1."),
             ("label_emb.0.2.", "add_embedding.linear_2."),
             ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."),
             ("out.2.", "conv_out."),
             ("middle_block.0.", "mid_block.resnets.0."),
             ("middle_block.1.", "mid_block.attentions.0."),
             ("middle_block.2.", "mid_block.resnets.1.")]
    for i in range(n_levels):
        for j in range(n_res):
            sgm = f"input_blocks.{(n_res + 1) * i + j + 1}."
            pairs += [(sgm + "0.", f"down_blocks.{i}.resnets.{j}."),
                      (sgm + "1.", f"down_blocks.{i}.attentions.{j}.")]
        if i < n_levels - 1:
            pairs.append((f"input_blocks.{(n_res + 1) * (i + 1)}.0.op.",
                          f"down_blocks.{i}.downsamplers.0.conv."))
        for j in range(n_res + 1):
            sgm = f"output_blocks.{(n_res + 1) * i + j}."
            pairs += [(sgm + "0.", f"up_blocks.{i}.resnets.{j}."),
                      (sgm + "1.", f"up_blocks.{i}.attentions.{j}.")]
        if i < n_levels - 1:
            # In SGM the upsampler follows the transformer (index 2) when the level has one.
            idx = 2 if unet_cfg.transformer_depth[n_levels - 1 - i] else 1
            pairs.append((f"output_blocks.{(n_res + 1) * i + n_res}.{idx}.",
                          f"up_blocks.{i}.upsamplers.0."))
    return pairs


def _swap_prefix(name, pairs):
    best = max((p for p in pairs if name.startswith(p[0])), key=lambda p: len(p[0]), default=None)
    if best is None:
        raise KeyError(name)
    return best[1] + name[len(best[0]):]


def _unet_diffusers_name(name, unet_cfg, pairs):
    out = _swap_prefix(name, pairs)
    if ".resnets." in out:
        head, tail = out.split(".resnets.", 1)
        idx, rest = tail.split(".", 1)
        rest = _swap_prefix(rest, _RESNET) if any(rest.startswith(a) for a, _ in _RESNET) else rest
        out = f"{head}.resnets.{idx}.{rest}"
    return out


_VAE_ATTN = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."),
             ("proj_out.", "to_out.0.")]


def _vae_diffusers_name(name, vae_cfg):
    n_levels = len(vae_cfg.ch_mult)
    m = re.fullmatch(r"(encoder|decoder)\.(down|up)\.(\d+)\.(block\.(\d+)|downsample|upsample)\.(.+)",
                     name)
    if m:
        part, kind, level, what, j, rest = m.groups()
        level = int(level) if kind == "down" else n_levels - 1 - int(level)
        blocks = "down_blocks" if kind == "down" else "up_blocks"
        if what.startswith("block"):
            rest = rest.replace("nin_shortcut.", "conv_shortcut.")
            return f"{part}.{blocks}.{level}.resnets.{j}.{rest}"
        sampler = "downsamplers" if kind == "down" else "upsamplers"
        return f"{part}.{blocks}.{level}.{sampler}.0.{rest}"
    m = re.fullmatch(r"(encoder|decoder)\.mid\.(block_1|block_2|attn_1)\.(.+)", name)
    if m:
        part, which, rest = m.groups()
        if which == "attn_1":
            return f"{part}.mid_block.attentions.0.{_swap_prefix(rest, _VAE_ATTN)}"
        rest = rest.replace("nin_shortcut.", "conv_shortcut.")
        return f"{part}.mid_block.resnets.{int(which[-1]) - 1}.{rest}"
    return name.replace("norm_out.", "conv_norm_out.")


def diffusers_place(component, name, cfg):
    """Where parameter `name` of `component` lives in its diffusers-folder weight file."""
    if component == "unet":
        return Place(_unet_diffusers_name(name, cfg.unet, unet_block_prefixes(cfg.unet)))
    if component == "vae":
        key = _vae_diffusers_name(name, cfg.vae)
        is_attn_conv = ".mid_block.attentions.0.to_" in key and name.endswith(".weight")
        return Place(key, reshape=is_attn_conv)
    return Place(name)      # Hugging Face CLIP names are ours
