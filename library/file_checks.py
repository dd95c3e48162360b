"""Checks on the files a user names, made before MindSpore is imported (its import alone takes
about 2 s), so that a wrong path fails at once: pickle checkpoints are refused unread, a hub id
is told from a missing file, and a LoRA with NaN or infinite weights is refused."""

import re
from pathlib import Path

import numpy as np

from library.errors import UserError
from library.safetensors_io import SafetensorsFile

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def refuse_pickle(path):
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UserError(f"{path}: pickle checkpoints ({path.suffix}) are refused, because loading "
                        "them can run arbitrary code. Convert it to .safetensors with a tool you "
                        "trust, or use the .safetensors release of the model")


def is_hub_id(value):
    """`owner/name` that is not a (missing) file name: a Hugging Face hub id."""
    value = str(value)
    return bool(HUB_ID.match(value)) and not value.endswith((".safetensors",) + PICKLE_SUFFIXES)


def refuse_non_finite(path, tensors=None):
    """A LoRA with NaN or infinite weights (saved by a diverged run) gives black images or a NaN
    loss at once: refuse it, naming the first bad tensor. `tensors`: {key: array}, else read."""
    if tensors is None:
        refuse_pickle(path)
        st = SafetensorsFile(path)
        tensors = {k: np.asarray(st.get(k)) for k in st.keys()}
    for key in sorted(tensors):
        value = tensors[key]
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            raise UserError(f"{path}: tensor {key} holds NaN or infinite values, so this LoRA "
                            "cannot be used (it was saved by a run whose weights diverged)")
