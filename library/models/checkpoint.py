"""Loading and saving SDXL weights: single-file .safetensors, diffusers folders, hub ids.

Loading is strict: every tensor of the file is used and every parameter is filled, or the load
fails listing the offending keys. Weights go into models built without random initialisation.
"""

import json
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import mindspore as ms
from mindspore import Tensor

from library import layers
from library.errors import UserError, listing
from library.file_checks import is_hub_id, refuse_pickle
from library.models import keymaps
from library.models.config import PRESETS
from library.models.sdxl import build_sdxl
from library.safetensors_io import SafetensorsFile, write_safetensors

COMPONENTS = ("unet", "text_encoder1", "text_encoder2", "vae")
DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16,
          "fp32": ms.float32, "fp16": ms.float16, "bf16": ms.bfloat16}


def _show(key):
    """A file key for messages; diffusers keys are (component, key) pairs."""
    return key if isinstance(key, str) else f"{keymaps.DIFFUSERS_FOLDERS[key[0]]}/{key[1]}"


def resolve_dtype(dtype):
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise UserError(f"unknown dtype {dtype!r}; choose one of float32, float16, bfloat16")
        return DTYPES[dtype]
    return dtype


# --- what a file is --------------------------------------------------------------------------

def _check_is_sdxl(path, keys):
    if any(k.startswith(("lora_unet_", "lora_te", "lora_te1_", "lora_te2_")) or ".lora_down." in k
           or ".lora_A." in k or ".lora.down." in k for k in keys):
        raise UserError(f"{path} is a LoRA, not a model checkpoint: pass the SDXL base model as "
                        "the model and the LoRA with --network_weights")
    if any(k.startswith("cond_stage_model.") for k in keys):
        raise UserError(f"{path} is a Stable Diffusion 1.x/2.x checkpoint (it has "
                        "cond_stage_model.*): this tool needs an SDXL checkpoint")
    if not any(k.startswith(keymaps.SINGLE_FILE_PREFIXES["unet"]) for k in keys):
        raise UserError(f"{path} is not an SDXL single-file checkpoint: it has no "
                        "model.diffusion_model.* tensors")
    if not any(k.startswith("conditioner.embedders.1.") for k in keys):
        raise UserError(f"{path} has a UNet but no SDXL text encoders (conditioner.embedders.*): "
                        "it is not an SDXL base checkpoint (an SD1.x/2.x or refiner model?)")


# --- the mapping, in both directions ---------------------------------------------------------

def is_lora_parameter_name(name):
    """True for the parameters an applied LoRA adds to a model: a path part starting with `lora_`
    (`...to_q.lora_branches.0.lora_down.weight`, library/lora/modules.py names them so). They are
    not part of the checkpoint: saving writes, and merges, the base weights only."""
    return any(part.startswith("lora_") for part in name.split("."))


def base_parameters(models, components=COMPONENTS):
    """(component, name, Parameter) for every parameter of the base models, LoRA's left out."""
    for component in components:
        for name, param in getattr(models, component).parameters_and_names():
            if not is_lora_parameter_name(name):
                yield component, name, param


def _file_layout(models, place_of, components=COMPONENTS):
    """key -> list of (component, name, param, place), from the models' own parameter names."""
    layout = defaultdict(list)
    for component, name, param in base_parameters(models, components):
        place = place_of(component, name)
        layout[place.key].append((component, name, param, place))
    return layout


def _file_shape(entries):
    """The shape a file holds for the parameters that map to one key."""
    _, _, param, place = entries[0]
    shape = tuple(param.shape)
    if place.part is not None:
        return (len(entries) * shape[0],) + shape[1:]
    if place.transpose:
        return shape[::-1]
    if place.reshape:
        return shape[:2]       # a 1x1 conv kernel stored as a Linear weight
    return shape


def checkpoint_shapes(models):
    """{single-file key: shape} for the models, without touching any weight data."""
    layout = _file_layout(models, keymaps.single_file_place)
    shapes = {key: _file_shape(entries) for key, entries in layout.items()}
    shapes[keymaps.TE2_LOGIT_SCALE_KEY] = ()
    return shapes


def _piece(array, entries, index):
    _, _, param, place = entries[index]
    if place.part is not None:
        size = param.shape[0]
        array = array[place.part * size:(place.part + 1) * size]
    elif place.transpose:
        array = array.T
    return array.reshape(param.shape)


def _fill(models, files, place_of, dtype, source):
    """Copy tensors from `files` ({key: (SafetensorsFile, key in file)}) into the models."""
    layout = _file_layout(models, place_of)
    missing = [_show(k) for k in layout if k not in files]
    unexpected = [_show(k) for k in files if k not in layout]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensors the model needs are missing: {listing(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} tensors are not part of an SDXL model: "
                         f"{listing(unexpected)}")
        raise UserError(f"{source} does not match the SDXL model: " + "; ".join(parts))
    wrong = [f"{_show(k)} {files[k][0].shape(files[k][1])} (expected {_file_shape(e)})"
             for k, e in layout.items() if files[k][0].shape(files[k][1]) != _file_shape(e)]
    if wrong:
        raise UserError(f"{source}: {len(wrong)} tensors have the wrong shape: {listing(wrong)}")
    for key, entries in layout.items():
        st, file_key = files[key]
        array = np.asarray(st.get(file_key), dtype=np.float32)
        for i, (_, _, param, _) in enumerate(entries):
            if param.dtype != dtype:
                param.set_dtype(dtype)
            param.set_data(Tensor(np.ascontiguousarray(_piece(array, entries, i)), dtype=dtype))
    for component in COMPONENTS:
        layers.check_parameter_names_once(getattr(models, component))


def detect_preset(source, shapes_of):
    """The preset whose UNet conv_in and label_emb shapes the file has. The shapes come from the
    presets' configs (building each preset's UNet to read them cost 2 s per load); `_fill`
    checks every tensor's shape against the built model afterwards."""
    probe = ("input_blocks.0.0.weight", "label_emb.0.0.weight")
    found = tuple(shapes_of(k) for k in probe)
    for name, cfg in PRESETS.items():
        u = cfg.unet
        if found == ((u.model_channels, u.in_channels, 3, 3), (u.time_embed_dim, u.adm_in_channels)):
            return name
    raise UserError(f"{source}: the UNet's shapes {found} match no supported SDXL configuration "
                    f"({', '.join(PRESETS)})")


# --- single file -----------------------------------------------------------------------------

def load_single_file(path, dtype="float32"):
    refuse_pickle(path)
    st = SafetensorsFile(path)
    keys = set(st.keys())
    _check_is_sdxl(path, keys)
    prefix = keymaps.SINGLE_FILE_PREFIXES["unet"]
    preset = detect_preset(path, lambda k: st.shape(prefix + k) if prefix + k in keys else None)
    models = build_sdxl(preset, init=False)
    files = {k: (st, k) for k in keys
             if k not in keymaps.IGNORED_KEYS and k != keymaps.TE2_LOGIT_SCALE_KEY}
    _fill(models, files, keymaps.single_file_place, resolve_dtype(dtype), path)
    if keymaps.TE2_LOGIT_SCALE_KEY in keys:
        models.te2_logit_scale = float(st.get(keymaps.TE2_LOGIT_SCALE_KEY))
    models.source = str(path)
    return models


def state_dict_numpy(models, place_of, components=COMPONENTS):
    """{file key: float32 array} for the models under a layout (fused and transposed as needed)."""
    out = {}
    for key, entries in _file_layout(models, place_of, components).items():
        arrays = [p.astype(ms.float32).asnumpy() for _, _, p, _ in entries]
        place = entries[0][3]
        if place.part is not None:
            out[key] = np.concatenate(arrays, axis=0)
        elif place.transpose:
            out[key] = arrays[0].T
        elif place.reshape:
            out[key] = arrays[0].reshape(arrays[0].shape[:2])
        else:
            out[key] = arrays[0]
    return out


def save_single_file(models, path, dtype=None, metadata=None):
    """Write the models as an SDXL single-file checkpoint (atomically). `dtype` None keeps the
    models' own (float32 if they differ)."""
    tensors = state_dict_numpy(models, keymaps.single_file_place)
    tensors[keymaps.TE2_LOGIT_SCALE_KEY] = np.array(models.te2_logit_scale, dtype=np.float32)
    write_safetensors(path, tensors, metadata=metadata, dtype=dtype or _models_dtype(models))


def _models_dtype(models):
    dtypes = {p.dtype for _, _, p in base_parameters(models)}
    if len(dtypes) == 1:
        return {ms.float16: "float16", ms.bfloat16: "bfloat16"}.get(dtypes.pop(), "float32")
    return "float32"


# --- diffusers folder ------------------------------------------------------------------------

def _diffusers_weight_file(folder, component):
    sub = Path(folder) / keymaps.DIFFUSERS_FOLDERS[component]
    stem = keymaps.DIFFUSERS_WEIGHT_FILES[component]
    for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors"):
        if (sub / name).is_file():
            return sub / name
    if any(sub.glob(f"{stem}*.bin")):
        raise UserError(f"{sub} has only pickle weights (.bin), which are refused because loading "
                        "them can run arbitrary code; use a copy with .safetensors weights")
    if any(sub.glob(f"{stem}*.safetensors.index.json")):
        raise UserError(f"{sub}: sharded weights are not supported yet; merge the shards into "
                        f"{stem}.safetensors")
    raise UserError(f"{folder} is not a diffusers SDXL folder: {sub}/{stem}.safetensors is missing")


def load_diffusers_folder(folder, dtype="float32"):
    files = {c: SafetensorsFile(_diffusers_weight_file(folder, c)) for c in COMPONENTS}
    unet = files["unet"]
    probe = {"input_blocks.0.0.weight": "conv_in.weight",
             "label_emb.0.0.weight": "add_embedding.linear_1.weight"}
    preset = detect_preset(folder, lambda k: unet.shape(probe[k])
                           if probe[k] in unet.keys() else None)
    models = build_sdxl(preset, init=False)
    cfg = models.config
    merged = {}
    for component, st in files.items():
        for key in st.keys():
            if key not in keymaps.IGNORED_KEYS:
                merged[(component, key)] = (st, key)

    def place_of(component, name):  # keys are (component, key): each component has its own file
        place = keymaps.diffusers_place(component, name, cfg)
        return place._replace(key=(component, place.key))

    _fill(models, merged, place_of, resolve_dtype(dtype), folder)
    models.source = str(folder)
    return models


def save_diffusers_folder(models, folder, dtype=None):
    """Write the models as a diffusers-format SDXL pipeline folder: weights and config.json per
    model, both tokenizers, the scheduler config and model_index.json (atomically per file)."""
    import shutil
    from library.models import diffusers_config
    from library.text import TOKENIZER_DIR
    folder = Path(folder)
    configs = diffusers_config.component_configs(models.config)
    for component in COMPONENTS:
        sub = folder / keymaps.DIFFUSERS_FOLDERS[component]
        sub.mkdir(parents=True, exist_ok=True)
        tensors = state_dict_numpy(
            models, lambda c, name: keymaps.diffusers_place(c, name, models.config), (component,))
        write_safetensors(sub / f"{keymaps.DIFFUSERS_WEIGHT_FILES[component]}.safetensors",
                          tensors, metadata={"format": "pt"},
                          dtype=dtype or _models_dtype(models))
        _write_json(sub / "config.json", configs[component])
    for sub, pad in (("tokenizer", diffusers_config.EOS), ("tokenizer_2", "!")):
        (folder / sub).mkdir(exist_ok=True)
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(Path(TOKENIZER_DIR) / name, folder / sub / name)
        for name, content in diffusers_config.tokenizer_files(pad).items():
            _write_json(folder / sub / name, content)
    (folder / "scheduler").mkdir(exist_ok=True)
    _write_json(folder / "scheduler" / "scheduler_config.json", diffusers_config.SCHEDULER)
    _write_json(folder / "model_index.json", diffusers_config.MODEL_INDEX)


def _write_json(path, obj):
    from library.safetensors_io import write_atomically
    write_atomically(path, [json.dumps(obj, indent=2, sort_keys=True).encode() + b"\n"])


# --- hub ids ---------------------------------------------------------------------------------

_HUB_PATTERNS = [f"{keymaps.DIFFUSERS_FOLDERS[c]}/{p}" for c in COMPONENTS
                 for p in ("config.json", "*.safetensors")] + ["model_index.json"]


def download_from_hub(repo_id):
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS)
    except Exception as e:  # the hub client raises many kinds; all mean "not available here"
        raise UserError(f"could not get {repo_id!r} from the Hugging Face hub "
                        f"({type(e).__name__}: {str(e).split('. ')[0][:300]}). Offline or "
                        "behind a firewall, pass a local path instead: an SDXL .safetensors "
                        "file or a diffusers-format folder") from None


def load(path_or_id, dtype="float32"):
    """Load SDXL weights from a single-file .safetensors, a diffusers-format folder or a Hugging
    Face hub id, strictly, into models of the matching preset, in float32/float16/bfloat16
    (exported as library.models.load_sdxl)."""
    path = Path(os.path.expanduser(str(path_or_id)))
    if path.is_dir():
        return load_diffusers_folder(path, dtype)
    if path.is_file():
        return load_single_file(path, dtype)
    if is_hub_id(path_or_id):
        return load_diffusers_folder(download_from_hub(str(path_or_id)), dtype)
    raise UserError(f"model not found: {path_or_id} (expected an SDXL .safetensors file, a "
                    "diffusers-format folder or a Hugging Face hub id like "
                    "stabilityai/stable-diffusion-xl-base-1.0)")
