"""LoRA key styles: every spelling of a LoRA's keys that other tools write (diffusers-named kohya
keys, PEFT/diffusers `lora_A`/`lora_B`, the older `.lora.down` forms) renamed to kohya's SGM names,
and the split of kohya keys into modules. The UNet's diffusers-to-SGM block map is
models/keymaps.py's, the one the checkpoint loader uses.
"""

import json

import numpy as np

from library.errors import UserError
from library.lora.names import UNET_PREFIX
from library.models import keymaps
from library.models.config import SDXL_BASE


_SUFFIXES = [  # (suffix, role) — every spelling of the two factors and alpha we convert
    (".lora_down.weight", "lora_down"), (".lora_up.weight", "lora_up"), (".alpha", "alpha"),
    (".lora_A.weight", "lora_down"), (".lora_B.weight", "lora_up"),
    (".lora_A.default.weight", "lora_down"), (".lora_B.default.weight", "lora_up"),
    (".lora.down.weight", "lora_down"), (".lora.up.weight", "lora_up"),
    ("_lora.down.weight", "lora_down"), ("_lora.up.weight", "lora_up"),
    (".lora_linear_layer.down.weight", "lora_down"), (".lora_linear_layer.up.weight", "lora_up"),
]
_PEFT_PREFIXES = {"unet.": UNET_PREFIX, "text_encoder.": "lora_te1",
                  "text_encoder_2.": "lora_te2"}
ROLE_SUFFIX = {"lora_down": ".lora_down.weight", "lora_up": ".lora_up.weight",
                "alpha": ".alpha"}


def _diffusers_unet_pairs(unet_config):
    """[(diffusers prefix, SGM prefix)] in dotted form, longest first."""
    cfg = unet_config or SDXL_BASE.unet
    pairs = []
    for sgm, hf in keymaps.unet_block_prefixes(cfg):
        if ".resnets." in hf:
            for sgm_in, hf_in in (("in_layers.2.", "conv1."), ("out_layers.3.", "conv2."),
                                  ("emb_layers.1.", "time_emb_proj."),
                                  ("skip_connection.", "conv_shortcut."),
                                  ("in_layers.0.", "norm1."), ("out_layers.0.", "norm2.")):
                pairs.append((hf + hf_in, sgm + sgm_in))
        pairs.append((hf, sgm))
    return sorted(pairs, key=lambda p: -len(p[0]))


def _diffusers_to_sgm_dotted(path, pairs):
    path = path.replace(".processor.", ".").replace(".to_out_lora", ".to_out.0")
    for hf, sgm in pairs:
        if (path + ".").startswith(hf):
            return (sgm + (path + ".")[len(hf):])[:-1]
    return path


def _diffusers_to_sgm_underscored(name, pairs):
    """`down_blocks_1_attentions_0_...` -> `input_blocks_4_1_...` (kohya's
    convert_diffusers_to_sai_if_needed, on kohya-style names)."""
    for hf, sgm in pairs:
        hf_u, sgm_u = hf.replace(".", "_"), sgm.replace(".", "_")
        if (name + "_").startswith(hf_u):
            return (sgm_u + (name + "_")[len(hf_u):])[:-1]
    return name


def _adapter_alphas(metadata):
    """alpha per PEFT prefix from diffusers' `lora_adapter_metadata` (its LoraConfig dicts)."""
    raw = (metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        conf = json.loads(raw)
    except ValueError:
        return {}
    out = {}
    for prefix in ("unet", "text_encoder", "text_encoder_2"):
        alpha = conf.get(f"{prefix}.lora_alpha")
        if alpha is not None:
            out[prefix + "."] = float(alpha)
    return out


def convert_to_kohya_keys(sd, metadata=None, unet_config=None):
    """Rename every key to kohya's SGM form (`lora_unet_input_blocks_4_1_..._to_q.lora_down.
    weight`).
    Keys it does not recognise are kept as they are (the strict check reports them)."""
    pairs = _diffusers_unet_pairs(unet_config)
    alphas = _adapter_alphas(metadata)
    out = {}
    for key, value in sd.items():
        new = key
        if key.startswith((UNET_PREFIX + "_", "lora_te1_", "lora_te2_")) and "." in key:
            module, rest = key.split(".", 1)
            if module.startswith(UNET_PREFIX + "_") and ("down_blocks" in module or
                                                         "up_blocks" in module or
                                                         "mid_block" in module):
                module = UNET_PREFIX + "_" + _diffusers_to_sgm_underscored(
                    module[len(UNET_PREFIX) + 1:], pairs)
            new = f"{module}.{rest}"
        else:
            prefix = next((p for p in _PEFT_PREFIXES if key.startswith(p)), None)
            suffix = next(((s, r) for s, r in _SUFFIXES if key.endswith(s)), None)
            if prefix is not None and suffix is not None:
                path = key[len(prefix):-len(suffix[0])]
                if prefix == "unet.":
                    path = _diffusers_to_sgm_dotted(path, pairs)
                elif path.startswith("encoder."):
                    # transformers 5 dropped CLIPTextModel's `text_model.` level, so diffusers
                    # 0.42 saves `text_encoder.encoder.layers.N...`; diffusers reads both
                    path = "text_model." + path
                new = f"{_PEFT_PREFIXES[prefix]}_{path.replace('.', '_')}" \
                      f"{ROLE_SUFFIX[suffix[1]]}"
                if suffix[1] == "lora_down" and prefix in alphas:
                    out.setdefault(new.rsplit(".", 2)[0] + ".alpha",
                                   np.array(alphas[prefix], dtype=np.float32))
        if new in out and not new.endswith(".alpha"):
            raise UserError(f"LoRA key {key!r} and another key both mean {new!r}")
        out[new] = value
    return out


def split_modules(sd):
    """{module name: {"lora_down": arr, "lora_up": arr, "alpha": arr}} from kohya keys; keys of
    any other form are left out (match_report lists them)."""
    modules = {}
    for key, value in sd.items():
        for role, suffix in ROLE_SUFFIX.items():
            if key.endswith(suffix) and key[:-len(suffix)] and "." not in key[:-len(suffix)]:
                modules.setdefault(key[:-len(suffix)], {})[role] = value
                break
    return modules
