#!/usr/bin/env python
"""Make the PyTorch reference fixtures that the MindSpore parity tests compare against.

Runs ONLY in a scratch venv with torch, diffusers and transformers (see tools/reference_fixtures.mk;
none of them is a dependency of the project or its tests). It never imports MindSpore, and from
`library/` it imports only the pure-Python `library/models/config.py`.

    python tools/make_reference_fixtures.py --ckpt TINY.safetensors --out tests/fixtures \
        [--diffusers_dir /work/scratch/tiny_diffusers]

1. Reads the tiny SDXL single-file checkpoint (SGM/LDM key names, as written by
   tools/make_tiny_sdxl.py) and builds the diffusers / transformers reference models from the
   `tiny` preset.
2. Converts the weights with diffusers' OWN single-file conversion code
   (diffusers.loaders.single_file_utils), strictly: every tensor of the checkpoint is consumed
   (or is on a short, explained ignore list), every model parameter is filled, no element is
   lost or duplicated. So our MindSpore key maps are checked against an independent one.
   The same conversion is also run on the SDXL base key list (tests/fixtures/
   sdxl_base_checkpoint_keys.tsv, meta tensors, no weights) against SDXL-base-sized models, to
   show that the config builders and the strictness rules hold for the real model too.
3. Runs UNet, both text encoders and the VAE on seeded numpy inputs (float32, no grad) and
   stores inputs and outputs in <out>/reference_tiny.npz.
4. Saves the models in diffusers format (save_pretrained, safetensors) into --diffusers_dir and
   writes <out>/tiny_diffusers_manifest.json: per folder its files, config, safetensors metadata
   and, per tensor, [shape, float64 sum, float64 sum of |x|].
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import time
import warnings
from pathlib import Path

# Offline, always: nothing here may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parents[1]


def _load_model_config():
    """library/models/config.py, loaded by file path: it is pure Python, but the package
    `library.models` imports MindSpore in its __init__, which this venv must not have."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("_sdxl_model_config",
                                                  REPO / "library" / "models" / "config.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


_cfg = _load_model_config()
SDXL_BASE, TINY = _cfg.SDXL_BASE, _cfg.TINY
assert "mindspore" not in sys.modules, "make_reference_fixtures.py must not import MindSpore"

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import diffusers  # noqa: E402
import transformers  # noqa: E402
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.loaders import single_file_utils as sfu  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402
from transformers import CLIPTokenizer  # noqa: E402

UNET_PREFIX = "model.diffusion_model."
TE1_PREFIX = "conditioner.embedders.0.transformer."
TE2_PREFIX = "conditioner.embedders.1.model."
VAE_PREFIX = "first_stage_model."

BOS, EOS = 49406, 49407
PROMPTS = [
    "a photo of a cat",
    "A watercolor painting of an old lighthouse, at dusk; waves crash (dramatically) "
    "on the rocks -- seagulls, mist & warm light!",
]

# Checkpoint keys that diffusers' converters leave out on purpose, with the reason. Anything else
# that is not consumed is an error.
IGNORED_KEYS = {
    TE2_PREFIX + "logit_scale":
        "OpenCLIP's contrastive temperature; CLIPTextModelWithProjection has no such parameter "
        "and convert_open_clip_checkpoint does not map it",
    TE1_PREFIX + "text_model.embeddings.position_ids":
        "a constant arange(77) buffer (non-persistent in transformers); present in some released "
        "SDXL files; checked to equal arange(77), then dropped",
}

# The SDXL base scheduler (stabilityai/stable-diffusion-xl-base-1.0, scheduler/scheduler_config.json).
SDXL_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", interpolation_type="linear", use_karras_sigmas=False,
    timestep_spacing="leading", steps_offset=1,
)


# ----------------------------------------------------------------------------------- configs

def unet_config(cfg, sample_size=128):
    """diffusers UNet2DConditionModel config for an SGM UNetConfig (SDXL layout)."""
    u = cfg.unet
    n = len(u.channel_mult)
    assert n == 3 and u.transformer_depth[0] == 0 and all(d > 0 for d in u.transformer_depth[1:]), \
        "this builder knows the SDXL layout only: 3 levels, no attention at level 0"
    channels = [u.model_channels * m for m in u.channel_mult]
    return dict(
        sample_size=sample_size,
        in_channels=u.in_channels,
        out_channels=u.out_channels,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        block_out_channels=channels,
        layers_per_block=u.num_res_blocks,
        # diffusers' own single-file rule: the SGM list as is (level 0 is unused; the mid block
        # takes the last entry).
        transformer_layers_per_block=list(u.transformer_depth),
        # the diffusers SDXL quirk: "attention_head_dim" holds the number of heads per level.
        attention_head_dim=[c // u.num_head_channels for c in channels],
        cross_attention_dim=u.context_dim,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=u.size_embed_dim,
        projection_class_embeddings_input_dim=u.adm_in_channels,
        flip_sin_to_cos=True,
        freq_shift=0,
        norm_num_groups=u.norm_groups,
    )


def sgm_original_config(cfg):
    """The SGM yaml (as a dict) that such a checkpoint is trained with; fed to diffusers' own
    create_*_diffusers_config_from_ldm as a cross-check of the builders above."""
    u, v = cfg.unet, cfg.vae
    return {"model": {"params": {
        "scale_factor": v.scaling_factor,
        "network_config": {"params": {
            "adm_in_channels": u.adm_in_channels, "num_classes": "sequential",
            "in_channels": u.in_channels, "out_channels": u.out_channels,
            "model_channels": u.model_channels, "attention_resolutions": [4, 2],
            "num_res_blocks": u.num_res_blocks, "channel_mult": list(u.channel_mult),
            "num_head_channels": u.num_head_channels, "use_linear_in_transformer": True,
            "transformer_depth": list(u.transformer_depth), "context_dim": u.context_dim,
        }},
        "first_stage_config": {"params": {"ddconfig": {
            "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": v.in_channels,
            "out_ch": v.out_channels, "ch": v.ch, "ch_mult": list(v.ch_mult),
            "num_res_blocks": v.num_res_blocks, "attn_resolutions": [], "dropout": 0.0,
        }}},
    }}}


def vae_config(cfg, sample_size=1024):
    v = cfg.vae
    n = len(v.ch_mult)
    return dict(
        sample_size=sample_size,
        in_channels=v.in_channels,
        out_channels=v.out_channels,
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=[v.ch * m for m in v.ch_mult],
        layers_per_block=v.num_res_blocks,
        latent_channels=v.latent_channels,
        norm_num_groups=v.norm_groups,
        scaling_factor=v.scaling_factor,
    )


def clip_config(c, pad_token_id):
    return CLIPTextConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
        max_position_embeddings=c.max_positions, hidden_act=c.hidden_act,
        layer_norm_eps=c.layer_norm_eps, projection_dim=c.projection_dim or c.hidden_size,
        bos_token_id=BOS, eos_token_id=c.eos_token_id, pad_token_id=pad_token_id,
    )


def check_config_against_diffusers(cfg):
    """diffusers derives most of the UNet/VAE config from the SGM yaml itself; it must agree with
    ours. (Its SDXL detection keys on context_dim 2048/1280 and a fixed 256 size-embedding width,
    so for the tiny preset the text_time fields are ours alone.)"""
    orig = sgm_original_config(cfg)
    with warnings.catch_warnings():  # image_size is deprecated there, but without it diffusers
        warnings.simplefilter("ignore")  # guesses the model type from checkpoint keys
        d = sfu.create_unet_diffusers_config_from_ldm(orig, {}, image_size=1024)
        dv = sfu.create_vae_diffusers_config_from_ldm(orig, {}, image_size=1024)
    ours = unet_config(cfg)
    for k in ("in_channels", "out_channels", "down_block_types", "up_block_types",
              "block_out_channels", "layers_per_block", "cross_attention_dim",
              "attention_head_dim", "use_linear_projection", "transformer_layers_per_block",
              "projection_class_embeddings_input_dim"):
        assert d[k] == ours[k], f"UNet config {k}: diffusers derives {d[k]!r}, we build {ours[k]!r}"
    if cfg.unet.context_dim in (2048, 1280):
        assert d["addition_embed_type"] == "text_time"
        assert d["addition_time_embed_dim"] == ours["addition_time_embed_dim"]
    ov = vae_config(cfg)
    for k in ("in_channels", "out_channels", "down_block_types", "up_block_types",
              "block_out_channels", "layers_per_block", "latent_channels", "scaling_factor"):
        assert dv[k] == ov[k], f"VAE config {k}: diffusers derives {dv[k]!r}, we build {ov[k]!r}"


# ------------------------------------------------------------------------------- conversion

class ReadTracker(dict):
    """A dict that remembers which keys the converter read."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.read = set()

    def __getitem__(self, k):
        self.read.add(k)
        return super().__getitem__(k)

    def get(self, k, default=None):
        if k in self:
            self.read.add(k)
        return super().get(k, default)


def convert_strict(name, prefix, checkpoint, convert, model):
    """Run one diffusers converter on the whole checkpoint, then prove it was lossless.

    Returns (converted state dict, notes)."""
    comp_keys = {k for k in checkpoint if k.startswith(prefix)}
    ignored = {k for k in comp_keys if k in IGNORED_KEYS}
    notes = [f"{name}: ignored {k} ({IGNORED_KEYS[k]})" for k in sorted(ignored)]
    for k in ignored:
        if k.endswith("position_ids"):
            v = checkpoint[k]
            assert torch.equal(v.reshape(-1).long(), torch.arange(v.numel())), f"{k} is not arange"
    tracked = ReadTracker({k: v for k, v in checkpoint.items() if k not in ignored})
    converted = convert(tracked)

    problems = []
    missing_src = [k for k, v in converted.items() if v is None]
    if missing_src:
        problems.append(f"converter looked up keys the checkpoint lacks (-> None) for: {sorted(missing_src)}")
    unread = sorted(comp_keys - ignored - tracked.read)
    if unread:
        problems.append(f"checkpoint keys diffusers did not consume: {unread}")
    foreign = sorted(tracked.read - comp_keys)
    if foreign:
        problems.append(f"converter read keys of another component: {foreign}")
    want = model.state_dict()
    missing = sorted(set(want) - set(converted))
    unexpected = sorted(set(converted) - set(want))
    if missing:
        problems.append(f"model parameters the converter did not produce: {missing}")
    if unexpected:
        problems.append(f"converted keys the model does not have: {unexpected}")
    bad_shape = sorted(f"{k}: {tuple(converted[k].shape)} vs model {tuple(want[k].shape)}"
                       for k in set(want) & set(converted)
                       if converted[k] is not None and converted[k].shape != want[k].shape)
    if bad_shape:
        problems.append(f"shape mismatches: {bad_shape}")
    if not problems:
        n_src = sum(checkpoint[k].numel() for k in comp_keys - ignored)
        n_dst = sum(v.numel() for v in converted.values())
        if n_src != n_dst:
            problems.append(f"element count changed: checkpoint {n_src}, converted {n_dst}")
    if problems:
        raise SystemExit(f"{name}: diffusers' conversion is not lossless:\n  " + "\n  ".join(problems))
    return converted, notes


def te1_convert(ckpt):
    return sfu.convert_ldm_clip_checkpoint(ckpt)


def te2_convert_fn(model):
    return lambda ckpt: sfu.convert_open_clip_checkpoint(model, ckpt, prefix=TE2_PREFIX)


def build_models(cfg, device=None):
    ctx = torch.device(device) if device else torch.device("cpu")
    with ctx:
        unet = UNet2DConditionModel(**unet_config(cfg))
        vae = AutoencoderKL(**vae_config(cfg))
        te1 = CLIPTextModel(clip_config(cfg.text_encoder1, pad_token_id=EOS))
        te2 = CLIPTextModelWithProjection(clip_config(cfg.text_encoder2, pad_token_id=0))
    return unet, vae, te1, te2


def convert_all(checkpoint, models):
    unet, vae, te1, te2 = models
    ucfg, vcfg = dict(unet.config), dict(vae.config)
    jobs = [
        ("unet", UNET_PREFIX, lambda c: sfu.convert_ldm_unet_checkpoint(c, ucfg), unet),
        ("vae", VAE_PREFIX, lambda c: sfu.convert_ldm_vae_checkpoint(c, vcfg), vae),
        ("text_encoder", TE1_PREFIX, te1_convert, te1),
        ("text_encoder_2", TE2_PREFIX, te2_convert_fn(te2), te2),
    ]
    known = set().union(*[{k for k in checkpoint if k.startswith(p)} for _, p, _, _ in jobs])
    stray = sorted(set(checkpoint) - known)
    if stray:
        raise SystemExit(f"checkpoint keys outside the four SDXL components: {stray}")
    out, notes = {}, []
    for name, prefix, fn, model in jobs:
        out[name], n = convert_strict(name, prefix, checkpoint, fn, model)
        notes += n
    return out, notes


def read_key_tsv(tsv):
    out = {}
    for line in Path(tsv).read_text().splitlines()[1:]:
        key, shape = line.split("\t")
        out[key] = json.loads(shape)
    return out


_REPEATS = [(re.compile(r"\b(transformer_blocks|resblocks|layers)\.\d+\."), r"\1.N."),
            (re.compile(r"((?:down|up)\.\d+\.block)\.\d+\."), r"\1.N.")]


def _pattern(key):
    for rx, rep in _REPEATS:
        key = rx.sub(rep, key)
    return key


def check_key_structure(shapes, base_shapes):
    """diffusers' converters accept some names and ranks the SGM checkpoints never use (an
    upsampler at output_blocks.2.1 as in SD 1.x, VAE attention q/k/v/proj_out as Linear instead of
    1x1 conv), so also compare the checkpoint's naming with the real SDXL base key list: the same
    key patterns (repeated blocks collapsed; shortcuts excluded, as they depend on channel counts
    and are checked by the strict load) with the same tensor ranks."""
    def patterns(d):
        out = {}
        for k, shape in d.items():
            if k in IGNORED_KEYS and not k.endswith("logit_scale"):
                continue
            if "skip_connection" in k or "nin_shortcut" in k:
                continue
            out.setdefault(_pattern(k), set()).add(len(shape))
        return out
    mine, base = patterns(shapes), patterns(base_shapes)
    problems = []
    extra = sorted(set(mine) - set(base))
    absent = sorted(set(base) - set(mine))
    ranks = sorted(f"{p}: rank {sorted(mine[p])} vs SDXL base {sorted(base[p])}"
                   for p in set(mine) & set(base) if mine[p] != base[p])
    if extra:
        problems.append(f"key patterns SDXL base does not have: {extra}")
    if absent:
        problems.append(f"SDXL base key patterns missing here: {absent}")
    if ranks:
        problems.append(f"tensor ranks differ: {ranks}")
    if problems:
        raise SystemExit("checkpoint naming differs from SDXL base:\n  " + "\n  ".join(problems))


def check_sdxl_base_keys(tsv):
    """Run the same strict conversion on the real SDXL base key list (meta tensors)."""
    check_config_against_diffusers(SDXL_BASE)
    ckpt = {k: torch.empty(shape, device="meta") for k, shape in read_key_tsv(tsv).items()}
    models = build_models(SDXL_BASE, device="meta")
    _, notes = convert_all(ckpt, models)
    return len(ckpt), notes


# -------------------------------------------------------------------------------- fixtures

def tokenize(tok, prompts):
    ids = tok(prompts, padding="max_length", max_length=77, truncation=True,
              return_tensors="np")["input_ids"].astype(np.int64)
    assert ids.shape == (len(prompts), 77) and (ids[:, 0] == BOS).all()
    return ids


@torch.no_grad()
def run_fixtures(models, tok1, tok2, seed=0):
    unet, vae, te1, te2 = models
    cfg = TINY
    rng = np.random.default_rng(seed)
    f = {}

    # UNet (non-square latent on purpose)
    f["unet_x"] = rng.standard_normal((2, 4, 16, 12), dtype=np.float32)
    f["unet_timesteps"] = np.array([10, 900], dtype=np.float32)
    f["unet_context"] = rng.standard_normal((2, 77, cfg.unet.context_dim), dtype=np.float32)
    f["unet_text_embeds"] = rng.standard_normal(
        (2, cfg.text_encoder2.projection_dim), dtype=np.float32)
    f["unet_time_ids"] = np.array([[1024, 768, 0, 16, 1024, 768],
                                   [832, 1216, 16, 0, 832, 1216]], dtype=np.float32)
    seen = {}
    hook = unet.add_embedding.register_forward_pre_hook(
        lambda mod, args: seen.__setitem__("y", args[0].detach().clone()))
    out = unet(torch.from_numpy(f["unet_x"]), torch.from_numpy(f["unet_timesteps"]),
               encoder_hidden_states=torch.from_numpy(f["unet_context"]),
               added_cond_kwargs={"text_embeds": torch.from_numpy(f["unet_text_embeds"]),
                                  "time_ids": torch.from_numpy(f["unet_time_ids"])}).sample
    hook.remove()
    f["unet_y"] = seen["y"].numpy()
    assert f["unet_y"].shape == (2, cfg.unet.adm_in_channels)
    f["unet_out"] = out.numpy()

    # Text encoders
    f["te_prompts"] = np.array(PROMPTS)
    for name, tok, te in (("te1", tok1, te1), ("te2", tok2, te2)):
        ids = tokenize(tok, PROMPTS)
        o = te(torch.from_numpy(ids), output_hidden_states=True)
        f[f"{name}_input_ids"] = ids
        f[f"{name}_hidden_states"] = torch.stack(o.hidden_states).numpy()
        f[f"{name}_last_hidden_state"] = o.last_hidden_state.numpy()
        if name == "te1":
            f["te1_pooler_output"] = o.pooler_output.numpy()
    # TE2's pooled output before the projection, then the projection itself
    o2 = te2.text_model(torch.from_numpy(f["te2_input_ids"]))
    f["te2_pooler_output"] = o2.pooler_output.numpy()
    f["te2_text_embeds"] = te2(torch.from_numpy(f["te2_input_ids"])).text_embeds.numpy()
    assert (f["te1_input_ids"][0, 6:] == EOS).all() and (f["te2_input_ids"][0, 7:] == 0).all()

    # VAE
    f["vae_image"] = rng.uniform(-1, 1, (1, 3, 64, 48)).astype(np.float32)
    f["vae_moments"] = vae.quant_conv(vae.encoder(torch.from_numpy(f["vae_image"]))).numpy()
    f["vae_z"] = rng.standard_normal((1, 4, 8, 6), dtype=np.float32)
    f["vae_decoded"] = vae.decode(torch.from_numpy(f["vae_z"])).sample.numpy()
    for k, v in f.items():
        if v.dtype.kind == "f":
            assert v.dtype == np.float32 and np.isfinite(v).all(), k
    return f


# -------------------------------------------------------------------------- diffusers folder

def tensor_stats(path):
    stats = {}
    with safe_open(path, "pt") as sf:
        meta = sf.metadata()
        for k in sorted(sf.keys()):
            t = sf.get_tensor(k).double()
            stats[k] = [list(t.shape), t.sum().item(), t.abs().sum().item()]
    return meta, stats


PIPELINE_ENTRIES = ("model_index.json", "scheduler", "text_encoder", "text_encoder_2", "tokenizer",
                    "tokenizer_2", "unet", "vae")


def check_diffusers_dir(out_dir):
    """Refuse a folder holding anything this tool does not write (it is emptied of our entries)."""
    if Path(out_dir).exists():
        other = sorted(p.name for p in Path(out_dir).iterdir() if p.name not in PIPELINE_ENTRIES)
        if other:
            raise SystemExit(f"--diffusers_dir {out_dir} holds files this tool did not write: "
                             f"{other}; choose an empty or new folder")


def save_diffusers(models, tok1, tok2, out_dir):
    unet, vae, te1, te2 = models
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1, tokenizer_2=tok2,
        unet=unet, scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER), add_watermarker=False)
    out_dir = Path(out_dir)
    check_diffusers_dir(out_dir)
    for name in PIPELINE_ENTRIES:  # start clean, so the manifest lists nothing stale
        q = out_dir / name
        shutil.rmtree(q) if q.is_dir() else q.unlink(missing_ok=True)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    manifest = {"model_index": json.loads((out_dir / "model_index.json").read_text()),
                "components": {}}
    for folder in sorted(p.name for p in out_dir.iterdir() if p.is_dir()):
        d = out_dir / folder
        entry = {"files": sorted(p.name for p in d.iterdir())}
        cfg_file = d / ("scheduler_config.json" if folder == "scheduler" else "config.json")
        if cfg_file.exists():
            entry["config_file"] = cfg_file.name
            entry["config"] = json.loads(cfg_file.read_text())
        small = {p.name: json.loads(p.read_text()) for p in sorted(d.glob("*.json"))
                 if p.name != cfg_file.name and p.stat().st_size < 16384}
        if small:  # tokenizer_config.json, special_tokens_map.json (vocab.json is too big)
            entry["json_files"] = small
        weights = sorted(d.glob("*.safetensors"))
        if weights:
            assert len(weights) == 1, f"{folder}: expected one weight file, got {weights}"
            entry["weight_file"] = weights[0].name
            entry["metadata"], entry["tensors"] = tensor_stats(weights[0])
        manifest["components"][folder] = entry
    return manifest


def check_roundtrip(models, out_dir):
    """Read the saved weight files back and compare every tensor with the loaded models."""
    unet, vae, te1, te2 = models
    for folder, model in (("unet", unet), ("vae", vae), ("text_encoder", te1),
                          ("text_encoder_2", te2)):
        (f,) = (Path(out_dir) / folder).glob("*.safetensors")
        saved = load_file(f)
        sd = model.state_dict()
        assert set(saved) == set(sd), folder
        for k, v in sd.items():
            assert torch.equal(saved[k], v), f"{folder}/{k}"


# ------------------------------------------------------------------------------------ main

def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_npz(path, arrays):
    """np.savez_compressed, but byte-reproducible (fixed zip timestamps) and written atomically,
    so regenerating unchanged fixtures leaves git clean."""
    import io
    import zipfile
    tmp = Path(str(path) + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())
    os.replace(tmp, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="tiny SDXL single-file checkpoint (.safetensors)")
    p.add_argument("--out", required=True, help="fixture folder (tests/fixtures)")
    p.add_argument("--diffusers_dir", default="/work/scratch/tiny_diffusers",
                   help="where to save the diffusers-format copy")
    p.add_argument("--seed", type=int, default=0, help="numpy seed for the inputs")
    args = p.parse_args(argv)
    check_diffusers_dir(args.diffusers_dir)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    torch.set_grad_enabled(False)

    base_tsv = REPO / "tests/fixtures/sdxl_base_checkpoint_keys.tsv"
    n_base, base_notes = check_sdxl_base_keys(base_tsv)
    print(f"SDXL base key list: {n_base} keys, diffusers' conversion is lossless")
    for n in base_notes:
        print("  " + n)

    check_config_against_diffusers(TINY)
    checkpoint = load_file(args.ckpt)
    dtypes = sorted({str(v.dtype) for v in checkpoint.values()})
    assert dtypes == ["torch.float32"], f"expected a float32 checkpoint, got {dtypes}"
    models = build_models(TINY)
    errors = []  # report both verdicts before giving up
    try:
        check_key_structure({k: list(v.shape) for k, v in checkpoint.items()},
                            read_key_tsv(base_tsv))
    except SystemExit as e:
        errors.append(str(e))
    try:
        converted, notes = convert_all(checkpoint, models)
    except SystemExit as e:
        errors.append(str(e))
    if errors:
        raise SystemExit(f"{args.ckpt}: rejected\n" + "\n".join(errors))
    for sd, model in zip(converted.values(), models):
        model.load_state_dict(sd, strict=True)
        model.eval()
    # Stability's convention, followed by diffusers: text_projection in the file is P (x @ P);
    # the Linear weight is P.T.
    P = checkpoint[TE2_PREFIX + "text_projection"]
    assert torch.equal(models[3].text_projection.weight, P.T), "diffusers did not transpose P"
    print(f"tiny checkpoint: {len(checkpoint)} keys, diffusers' conversion is lossless; "
          "text_projection loaded as P.T (pooled = x @ P)")
    for n in notes:
        print("  " + n)

    vocab = REPO / "configs/clip_tokenizer/vocab.json"
    merges = REPO / "configs/clip_tokenizer/merges.txt"
    tok1 = CLIPTokenizer(str(vocab), str(merges), model_max_length=77)
    tok2 = CLIPTokenizer(str(vocab), str(merges), model_max_length=77, pad_token="!")

    fixtures = run_fixtures(models, tok1, tok2, seed=args.seed)
    # pooled TE2 output must be x @ P with the file's P
    np.testing.assert_allclose(fixtures["te2_text_embeds"],
                               fixtures["te2_pooler_output"] @ P.numpy(), rtol=1e-5, atol=1e-6)
    info = {"ckpt_sha256": sha256(args.ckpt), "seed": args.seed, "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "numpy": np.__version__}
    fixtures["info"] = np.array(json.dumps(info, sort_keys=True))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    npz = out / "reference_tiny.npz"
    save_npz(npz, fixtures)

    manifest = save_diffusers(models, tok1, tok2, args.diffusers_dir)
    check_roundtrip(models, args.diffusers_dir)
    manifest["source"] = info
    mpath = out / "tiny_diffusers_manifest.json"
    tmp = mpath.with_name(mpath.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, mpath)

    for k, v in fixtures.items():
        print(f"  {k:24s} {v.dtype!s:8s} {tuple(v.shape)}")
    print(f"wrote {npz} ({npz.stat().st_size} bytes), {mpath} ({mpath.stat().st_size} bytes), "
          f"{args.diffusers_dir}; {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
