"""Full-size SDXL LoRA keys (no weights): exactly kohya's; kohya-made files check clean; and the
key checks that ComfyUI, A1111/Forge and diffusers apply to kohya-format SDXL LoRAs."""

import gzip
import json
import re

import numpy as np
import pytest

from conftest import FIXTURES, run_tool
from library import lora_metadata as md
from library.models import build_sdxl
from library.models.keymaps import diffusers_place
from library.safetensors_io import SafetensorsFile, write_safetensors
from networks import lora


def kohya_tsv():
    rows = [line.rstrip("\n").split("\t") for line in
            open(FIXTURES / "kohya_sdxl_lora_keys_conv_dim.tsv")][1:]
    return {k: tuple(json.loads(s.replace("(", "[").replace(")", "]").replace(",]", "]")))
            for k, s, _ in rows}


def kohya_manifest(name):
    with gzip.open(FIXTURES / "kohya_lora" / name) as f:
        return json.load(f)


def checkpoint_keys():
    return [line.split("\t")[0] for line in open(FIXTURES / "sdxl_base_checkpoint_keys.tsv")][1:]


@pytest.fixture(scope="module")
def base():
    return build_sdxl("sdxl_base", init=False)


@pytest.fixture(scope="module")
def full_network(base):
    return lora.create_network(1.0, 4, 1.0, None, [base.text_encoder1, base.text_encoder2],
                               base.unet, conv_dim="4")


@pytest.fixture(scope="module")
def our_full_file(full_network, tmp_path_factory):
    """Our full-size LoRA (rank 4, conv_dim 4, fp16) with kohya-style metadata."""
    rng = np.random.default_rng(0)
    sd = full_network.state_dict()
    for k in sd:
        if k.endswith("lora_up.weight"):
            sd[k] = rng.normal(0, 0.01, sd[k].shape).astype(np.float32)
    meta = md.network_metadata({"conv_dim": "4"}, 4, 1.0)
    meta["ss_output_name"] = "ours"
    meta.update(md.modelspec_metadata(title="ours", timestamp=0))
    path = tmp_path_factory.mktemp("full") / "ours_full.safetensors"
    lora.save_lora_file(path, sd, "fp16", meta)
    return path


def test_full_size_keys_and_shapes_are_kohyas_with_conv_dim(full_network):
    ours, ref = full_network.key_shapes(), kohya_tsv()
    assert len(ref) == 3156
    assert set(ours) == set(ref)
    assert {k: ours[k] for k in ref} == ref
    assert (len(full_network.text_encoder_loras), len(full_network.unet_loras)) == (264, 788)
    assert sum(n.startswith("lora_te1_") for n in full_network.module_names()) == 72


def test_without_conv_dim_is_the_722_module_subset(base):
    net = lora.create_network(1.0, 4, None, None, [base.text_encoder1, base.text_encoder2],
                              base.unet)
    ref = kohya_tsv()
    ours = net.key_shapes()
    assert len(net.unet_loras) == 722 and len(net.text_encoder_loras) == 264
    assert set(ours) <= set(ref)
    assert all(ours[k] == ref[k] for k in ours)
    # The 66 left out are exactly the ResBlock / Downsample / Upsample ones.
    left_out = {k.split(".")[0] for k in set(ref) - set(ours)}
    assert len(left_out) == 66
    assert all(re.search(r"_(in_layers_2|out_layers_3|emb_layers_1|skip_connection|op|2_conv)$",
                         n) for n in left_out)


@pytest.mark.parametrize("manifest", ["sdxl_conv_r1_fp16.manifest.json.gz",
                                      "sdxl_conv_r1_nosaveprecision.manifest.json.gz"])
def test_kohya_made_lora_matches_every_module(manifest, base, tmp_path):
    """Key list, shapes and dtypes of a LoRA written by kohya's own networks/lora.py
    (rank 1, conv_dim 1; default alpha: int64 in the unconverted file) fit all 1052 modules."""
    man = kohya_manifest(manifest)
    codes = {"F16": np.float16, "F32": np.float32, "I64": np.int64}
    tensors = {k: np.ones(shape, dtype=codes[code]) for k, (shape, code) in man["keys"].items()}
    path = tmp_path / "kohya.safetensors"
    write_safetensors(path, tensors, metadata=man["metadata"])
    weights, meta = lora.load_lora_file(path)
    targets = lora.model_targets([base.text_encoder1, base.text_encoder2], base.unet)
    report = lora.match_report(weights, targets)
    assert len(report["matched"]) == 1052
    assert report["unmatched_keys"] == [] and report["problems"] == []
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"


def test_kohya_made_lora_passes_check_lora_cli(tmp_path, capsys):
    man = kohya_manifest("sdxl_conv_r1_nosaveprecision.manifest.json.gz")
    codes = {"F16": np.float16, "F32": np.float32, "I64": np.int64}
    tensors = {k: np.ones(shape, dtype=codes[code]) for k, (shape, code) in man["keys"].items()}
    assert {str(t.dtype) for k, t in tensors.items() if k.endswith(".alpha")} >= {"int64"}
    path = tmp_path / "kohya.safetensors"
    write_safetensors(path, tensors, metadata=man["metadata"])
    from tools import check_lora      # the command's entry point, in-process
    assert check_lora.main([str(path), "--preset", "sdxl_base", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["counts"]["matched"] == 1052
    assert doc["counts"]["unmatched_keys"] == 0 and doc["counts"]["unmatched_modules"] == 0
    assert doc["metadata"]["ss_network_module"] == "networks.lora"


def test_our_full_size_file_passes_check_lora(our_full_file):
    proc = run_tool("tools/check_lora.py", our_full_file, "--preset", "sdxl_base")
    assert "matched: 1052  unmatched modules: 0  unmatched keys: 0" in proc.stdout
    st = SafetensorsFile(our_full_file)
    assert {st.dtype(k) for k in st.keys() if k.endswith(".alpha")} == {"F32"}
    assert {st.dtype(k) for k in st.keys() if not k.endswith(".alpha")} == {"F16"}


# --- what consumers check (shared/reference peers_and_users.md §3) ---------------------------

def _file_keys_and_meta(path):
    st = SafetensorsFile(path)
    return st.keys(), st.metadata, st


def test_comfyui_key_map_loads_every_key(our_full_file):
    """ComfyUI model_lora_keys_unet/clip: `lora_unet_` + (diffusion_model.X.weight with . -> _),
    TE1/TE2 by the layer regex; tensor suffixes .lora_up/.lora_down.weight and .alpha; anything
    else logs "lora key not loaded"."""
    keys, _, st = _file_keys_and_meta(our_full_file)
    unet_map = {"lora_unet_" + k[len("model.diffusion_model."):-len(".weight")].replace(".", "_")
                for k in checkpoint_keys()
                if k.startswith("model.diffusion_model.") and k.endswith(".weight")}
    clip_re = re.compile(r"lora_te[12]_text_model_encoder_layers_(\d+)_"
                         r"(mlp_fc1|mlp_fc2|self_attn_[qkv]_proj|self_attn_out_proj)")
    not_loaded = []
    for key in keys:
        module, _, part = key.partition(".")
        if part not in ("lora_up.weight", "lora_down.weight", "alpha"):
            not_loaded.append(key)
        elif not (module in unet_map or clip_re.fullmatch(module)):
            not_loaded.append(key)
    assert not_loaded == []
    # ComfyUI's scale = alpha / lora_down.shape[0]
    name = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    assert float(st.get(name + ".alpha")) / st.shape(name + ".lora_down.weight")[0] == 0.25


def test_a1111_forge_names_and_metadata(our_full_file):
    """A1111/Forge: split at the first '.', `lora_unet` -> `diffusion_model`, `lora_te1_text_model`
    -> `0_transformer_text_model`, TE2 -> `1_model_transformer_resblocks_N_` (fc1 -> c_fc,
    fc2 -> c_proj, self_attn -> attn, q/k/v -> fused in_proj); the SDXL filter reads
    ss_base_model_version; sshs_model_hash is used as the hash."""
    keys, meta, _ = _file_keys_and_meta(our_full_file)
    compvis = set()
    for k in checkpoint_keys():
        stem = k.rsplit(".", 1)[0]
        if k.startswith("model.diffusion_model."):
            compvis.add("diffusion_model_" + stem[len("model.diffusion_model."):].replace(".", "_"))
        elif k.startswith("conditioner.embedders.0."):
            compvis.add("0_" + stem[len("conditioner.embedders.0."):].replace(".", "_"))
        elif k.startswith("conditioner.embedders.1."):
            compvis.add("1_" + stem[len("conditioner.embedders.1."):].replace(".", "_"))
        if k.endswith("attn.in_proj_weight"):
            compvis.add("1_" + k[len("conditioner.embedders.1."):-len("_weight")]
                        .replace(".", "_"))

    def to_compvis(name):
        if name.startswith("lora_unet_"):
            return "diffusion_model_" + name[len("lora_unet_"):]
        if name.startswith("lora_te1_text_model"):
            return "0_transformer_text_model" + name[len("lora_te1_text_model"):]
        m = re.fullmatch(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", name)
        rest = m.group(2).replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj")
        rest = rest.replace("self_attn", "attn")
        if re.fullmatch(r"attn_[qkv]_proj", rest):
            rest = "attn_in_proj"       # re_x_proj: q/k/v go to the fused MultiheadAttention
        return f"1_model_transformer_resblocks_{m.group(1)}_{rest}"

    modules = {k.split(".", 1)[0] for k in keys}
    assert all(to_compvis(n) in compvis for n in modules), \
        sorted(n for n in modules if to_compvis(n) not in compvis)[:5]
    assert meta["ss_base_model_version"].startswith("sdxl_")
    assert meta["ss_output_name"] == "ours"
    assert re.fullmatch(r"[0-9a-f]{64}", meta["sshs_model_hash"])
    assert re.fullmatch(r"[0-9a-f]{8}", meta["sshs_legacy_hash"])
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"


def test_diffusers_lora_state_dict_accepts_the_keys(our_full_file, base):
    """diffusers lora_state_dict: no dora_scale; all keys kohya-prefixed (so the SGM->diffusers
    path is taken); every UNet module renumbers to a diffusers module; every lora_down has its
    lora_up; nothing is left over (else ValueError "keys have not been correctly renamed")."""
    keys, _, _ = _file_keys_and_meta(our_full_file)
    assert not any("dora_scale" in k for k in keys)
    assert all(k.startswith(("lora_te_", "lora_unet_", "lora_te1_", "lora_te2_")) for k in keys)
    cfg = base.config
    unet_params = {n for n, _ in base.unet.parameters_and_names()}
    diffusers_weights = {diffusers_place("unet", n, cfg).key for n in unet_params}
    sgm_by_underscored = {n[:-len(".weight")].replace(".", "_"): n[:-len(".weight")]
                          for n in unet_params if n.endswith(".weight")}
    modules = {k.split(".", 1)[0] for k in keys}
    for name in modules:
        assert f"{name}.lora_up.weight" in keys and f"{name}.alpha" in keys
        if name.startswith("lora_unet_"):
            sgm = sgm_by_underscored[name[len("lora_unet_"):]]
            assert diffusers_place("unet", sgm + ".weight", cfg).key in diffusers_weights
    leftover = [k for k in keys if k.rsplit(".", 1)[0].rsplit(".", 1)[-1] not in
                ("lora_down", "lora_up") and not k.endswith(".alpha")]
    assert leftover == []
