"""Metadata that kohya's scripts write into LoRA files: `ss_*` training keys, SAI `modelspec.*`
keys, and the `sshs_*` hashes that A1111's additional-networks extension reads.

Pure Python and numpy. Every value that ends up in a file is a string (the safetensors rule);
kohya `str()`s its values, so `None` becomes "None" and `True` becomes "True" here as there.
"""

import datetime
import hashlib
import json
import os
import subprocess

import numpy as np

from library.safetensors_io import DTYPE_RANK, encode_tensor

# kohya: sdxl_model_util.MODEL_VERSION_SDXL_BASE_V1_0, train_util.SS_METADATA_MINIMUM_KEYS
SDXL_BASE_MODEL_VERSION = "sdxl_base_v1-0"
SS_METADATA_MINIMUM_KEYS = ("ss_v2", "ss_base_model_version", "ss_network_module",
                            "ss_network_dim", "ss_network_alpha", "ss_network_args")

MODELSPEC_VERSION = "1.0.1"
MODELSPEC_SDXL_LORA_ARCHITECTURE = "stable-diffusion-xl-v1-base/lora"
MODELSPEC_SDXL_CHECKPOINT_ARCHITECTURE = "stable-diffusion-xl-v1-base"
MODELSPEC_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"
IMPLEMENTATION_NAME = "sdxl-lora-mindspore"


# --- hashes ----------------------------------------------------------------------------------

def safetensors_layout(tensors, metadata=None, dtype=None):
    """(header bytes, [data chunks]) exactly as the `safetensors` library serialises `tensors`
    (name -> array; `dtype`, one or per name, converts floating tensors as write_safetensors)."""
    encoded = {name: encode_tensor(arr, dtype.get(name) if isinstance(dtype, dict) else dtype)
               for name, arr in tensors.items()}
    order = sorted(encoded, key=lambda n: (-DTYPE_RANK[encoded[n][0]], n))
    header, chunks, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = {k: metadata[k] for k in sorted(metadata)}
    for name in order:
        code, data = encoded[name]
        header[name] = {"dtype": code, "shape": [int(s) for s in np.shape(tensors[name])],
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    blob = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    blob += b" " * (-len(blob) % 8)
    return len(blob).to_bytes(8, "little") + blob, chunks


def precalculate_safetensors_hashes(tensors, metadata, dtype=None):
    """kohya's train_util.precalculate_safetensors_hashes: (sshs_model_hash, sshs_legacy_hash).

    Both are computed over the in-memory safetensors serialisation of `tensors` with only the
    `ss_*` metadata kept (so that editing user metadata later does not change them):
    model hash = sha256 of everything after the header; legacy hash = first 8 hex digits of the
    sha256 of bytes [0x100000, 0x110000) of the whole serialisation.
    """
    ss_only = {k: v for k, v in (metadata or {}).items() if k.startswith("ss_")}
    head, chunks = safetensors_layout(tensors, ss_only, dtype)
    model = hashlib.sha256()
    for chunk in chunks:
        model.update(chunk)
    # The legacy window, taken from the concatenation without building it.
    legacy, pos, lo, hi = hashlib.sha256(), 0, 0x100000, 0x110000
    for piece in [head] + chunks:
        end = pos + len(piece)
        if end > lo and pos < hi:
            legacy.update(piece[max(lo - pos, 0):min(hi, end) - pos])
        pos = end
    return model.hexdigest(), legacy.hexdigest()[:8]


def model_hash(path):
    """webui's legacy model hash (`ss_sd_model_hash`): sha256 of 64 KiB at offset 1 MiB, 8 hex."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def calculate_sha256(path):
    """Full-file sha256 (`ss_new_sd_model_hash`)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- ss_* keys -------------------------------------------------------------------------------

def stringify(metadata):
    """kohya's final step: every value `str()`-ed (None -> "None")."""
    return {k: str(v) for k, v in metadata.items()}


def minimum_metadata(metadata):
    """The keys kept with --no_metadata (kohya's SS_METADATA_MINIMUM_KEYS)."""
    return {k: metadata[k] for k in SS_METADATA_MINIMUM_KEYS if k in metadata}


def build_minimum_network_metadata(v2, base_model, network_module, network_dim, network_alpha,
                                   network_args=None):
    """kohya's train_util.build_minimum_network_metadata (used by the LoRA merge tool)."""
    metadata = {"ss_network_module": network_module, "ss_network_dim": network_dim,
                "ss_network_alpha": network_alpha}
    if v2 is not None:
        metadata["ss_v2"] = v2
    if base_model is not None:
        metadata["ss_base_model_version"] = base_model
    if network_args is not None:
        metadata["ss_network_args"] = json.dumps(network_args)
    return metadata


def network_metadata(net_kwargs=None, network_dim=None, network_alpha=None,
                     network_module="networks.lora", network_dropout=None):
    """The network part of kohya's ss_* metadata (already strings).

    `ss_network_dim` / `ss_network_alpha` hold the values as given on the command line ("None"
    when not given, as kohya); `ss_network_args` is the JSON of the --network_args dict and only
    present when network args were given.
    """
    md = {"ss_network_module": network_module, "ss_network_dim": network_dim,
          "ss_network_alpha": network_alpha, "ss_network_dropout": network_dropout,
          "ss_v2": False, "ss_base_model_version": SDXL_BASE_MODEL_VERSION}
    if net_kwargs:
        md["ss_network_args"] = json.dumps(net_kwargs)
    return stringify(md)


def model_name_metadata(pretrained_model_name_or_path=None, vae=None):
    """ss_sd_model_name / ss_sd_model_hash / ss_new_sd_model_hash (and the VAE's), as kohya:
    hashes only when the path is a local file, names reduced to the basename then."""
    md = {}
    for value, stem in ((pretrained_model_name_or_path, "sd_model"), (vae, "vae")):
        if value is None:
            continue
        name = str(value)
        if os.path.isfile(name):
            md[f"ss_{stem}_hash"] = model_hash(name)
            md[f"ss_new_{stem}_hash"] = calculate_sha256(name)
            name = os.path.basename(name)
        elif os.path.exists(name):
            name = os.path.basename(os.path.normpath(name))
        md[f"ss_{stem}_name"] = name
    return md


# --- modelspec.* -----------------------------------------------------------------------------

def implementation_version():
    """`<our name>/<git commit of this checkout>` (kohya writes `sd-scripts/<commit>`)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)), timeout=5)
        commit = out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return f"{IMPLEMENTATION_NAME}/{commit or 'unknown'}"


def modelspec_metadata(title=None, timestamp=None, resolution=None, lora=True,
                       v_parameterization=False, author=None, description=None, license=None,
                       tags=None, merged_from=None, trigger_phrase=None, usage_hint=None,
                       thumbnail=None, min_timestep=None, max_timestep=None, clip_skip=None,
                       impl_version=None):
    """SAI ModelSpec 1.0.1 keys for an SDXL LoRA (or checkpoint, lora=False), as kohya's
    sai_model_spec.build_metadata writes them: only keys with a value are present."""
    import time
    timestamp = time.time() if timestamp is None else timestamp
    if title is None:
        title = f"{'LoRA' if lora else 'Checkpoint'}@{timestamp}"
    if resolution is None:
        resolution = (1024, 1024)
    if isinstance(resolution, str):
        resolution = tuple(int(v) for v in resolution.split(","))
    if isinstance(resolution, int):
        resolution = (resolution, resolution)
    if len(resolution) == 1:
        resolution = (resolution[0], resolution[0])
    timestep_range = None
    if min_timestep is not None or max_timestep is not None:
        timestep_range = f"{0 if min_timestep is None else min_timestep}," \
                         f"{1000 if max_timestep is None else max_timestep}"
    md = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": (MODELSPEC_SDXL_LORA_ARCHITECTURE if lora
                                   else MODELSPEC_SDXL_CHECKPOINT_ARCHITECTURE),
        "modelspec.implementation": MODELSPEC_IMPLEMENTATION,
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
        "modelspec.description": description,
        "modelspec.author": author,
        "modelspec.date": datetime.datetime.fromtimestamp(int(timestamp)).isoformat(),
        "modelspec.license": license,
        "modelspec.tags": tags,
        "modelspec.merged_from": merged_from,
        "modelspec.prediction_type": "v" if v_parameterization else "epsilon",
        "modelspec.timestep_range": timestep_range,
        "modelspec.encoder_layer": None if clip_skip is None else str(clip_skip),
        "modelspec.trigger_phrase": trigger_phrase,
        "modelspec.usage_hint": usage_hint,
        "modelspec.thumbnail": thumbnail,
        "modelspec.implementation_version": impl_version or implementation_version(),
    }
    return {k: str(v) for k, v in md.items() if v is not None}


def lora_metadata_from_args(args, net_kwargs=None, title=None, timestamp=None):
    """ss_* network keys + modelspec keys for a LoRA from a kohya-style args namespace (the
    trainer adds its dataset and hyper-parameter keys). Honours --no_metadata."""
    get = lambda name, default=None: getattr(args, name, default)  # noqa: E731
    md = network_metadata(net_kwargs or None, get("network_dim"), get("network_alpha"),
                          get("network_module", "networks.lora"), get("network_dropout"))
    md.update(stringify(model_name_metadata(get("pretrained_model_name_or_path"), get("vae"))))
    if get("no_metadata", False):
        md = minimum_metadata(md)
    md.update(modelspec_metadata(
        title=title or get("metadata_title") or get("output_name"), timestamp=timestamp,
        resolution=get("resolution"), v_parameterization=bool(get("v_parameterization", False)),
        author=get("metadata_author"), description=get("metadata_description"),
        license=get("metadata_license"), tags=get("metadata_tags"),
        trigger_phrase=get("metadata_trigger_phrase"), usage_hint=get("metadata_usage_hint"),
        min_timestep=get("min_timestep"), max_timestep=get("max_timestep"),
        clip_skip=get("clip_skip")))
    return md


def merged_from(paths, metadata_of):
    """kohya's sai_model_spec.build_merged_from: each model's modelspec.title, else its file
    stem, joined with ', '. `metadata_of(path)` returns a file's metadata dict."""
    titles = []
    for p in paths:
        title = metadata_of(p).get("modelspec.title")
        titles.append(title if title is not None else os.path.splitext(os.path.basename(p))[0])
    return ", ".join(titles)
