"""LoRA .safetensors files as kohya reads and writes them: any key style in (converted to kohya's
names), kohya's layout out (factors in the save precision, float32 scalar alphas, the sshs hashes
A1111 reads), written atomically.
"""

import numpy as np
import mindspore as ms

from library import lora_metadata as md_lib
from library.errors import UserError
from library.file_checks import refuse_non_finite, refuse_pickle
from library.lora.keys import convert_to_kohya_keys
from library.safetensors_io import SafetensorsFile, write_safetensors

SAVE_DTYPES = {None: None, "float": "float32", "float32": "float32", "fp32": "float32",
               "fp16": "float16", "float16": "float16", "bf16": "bfloat16",
               "bfloat16": "bfloat16"}


def load_lora_file(path, unet_config=None):
    """Read a LoRA .safetensors into ({kohya key: float32 array}, metadata). Diffusers-named
    kohya keys and PEFT/diffusers-format keys are converted to kohya's SGM names."""
    refuse_pickle(path)
    st = SafetensorsFile(path)
    sd = {k: np.asarray(st.get(k)) for k in st.keys()}
    if not sd:
        raise UserError(f"{path} holds no tensors: it is not a LoRA")
    refuse_non_finite(path, sd)
    return convert_to_kohya_keys(sd, st.metadata, unet_config), st.metadata


def save_lora_file(file, state_dict, dtype=None, metadata=None):
    """Write {kohya key: array} like kohya's save_weights: the factors in `dtype` (None keeps
    them; "float"/"fp16"/"bf16"), `.alpha` always a float32 scalar, `metadata` plus the sshs
    hashes (computed as kohya does, over this exact serialisation); atomically."""
    if dtype is not None and not isinstance(dtype, str):
        dtype = {ms.float32: "float", ms.float16: "fp16", ms.bfloat16: "bf16"}[dtype]
    if dtype not in SAVE_DTYPES:
        raise UserError(f"unknown save precision {dtype!r}; choose float, fp16 or bf16")
    save_dtype = SAVE_DTYPES[dtype]
    tensors, dtypes = {}, {}
    for key, value in state_dict.items():
        if key.endswith(".alpha"):
            tensors[key] = np.asarray(value, dtype=np.float32).reshape(())
            dtypes[key] = "float32"
        else:
            tensors[key] = np.asarray(value)
            dtypes[key] = save_dtype
    metadata = dict(metadata or {})
    model_hash, legacy_hash = md_lib.precalculate_safetensors_hashes(tensors, metadata, dtypes)
    metadata["sshs_model_hash"] = model_hash
    metadata["sshs_legacy_hash"] = legacy_hash
    write_safetensors(file, tensors, metadata=metadata, dtype=dtypes)
