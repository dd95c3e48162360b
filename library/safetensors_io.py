"""Reading and writing .safetensors files with numpy, bfloat16 included, atomically.

The `safetensors` package's numpy backend cannot hold bfloat16 (numpy has no such dtype), and
SDXL checkpoints and LoRAs are often saved in it; the format is a length-prefixed JSON header
followed by raw little-endian tensors, so this module reads and writes it directly. Reading
memory-maps the file (a 7 GB checkpoint is not copied) and checks every offset, so a truncated
download is reported as such instead of failing somewhere inside a model.
"""

import json
import os
import struct
import tempfile

import numpy as np

from library.errors import UserError

_NUMPY_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_CODES = {np.dtype(v): k for k, v in _NUMPY_DTYPES.items()}
# Rank of each dtype in the Rust `safetensors` library's Dtype enum. The library writes tensors in
# descending rank, then by name; so does write_safetensors, so that a file's data section is
# byte-identical to the library's (kohya's LoRA hashes are computed over that layout).
DTYPE_RANK = {"BOOL": 0, "U8": 1, "I8": 2, "I16": 3, "U16": 4, "F16": 5, "BF16": 6, "I32": 7,
              "U32": 8, "F32": 9, "F64": 10, "I64": 11, "U64": 12}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """A lazily read .safetensors file: `keys()`, `shape(key)`, `dtype(key)`, `get(key)`.

    `get` returns float32 for bfloat16 tensors (exactly: bf16 is the top half of a float32).
    """

    def __init__(self, path):
        self.path = str(path)
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                prefix = f.read(8)
                if len(prefix) < 8:
                    raise ValueError("shorter than a safetensors header")
                (n,) = struct.unpack("<Q", prefix)
                if n > _MAX_HEADER or 8 + n > size:
                    raise ValueError("header length points past the end of the file")
                header = json.loads(f.read(n))
        except OSError as e:
            raise UserError(f"cannot read {self.path}: {e.strerror}") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f"{self.path} is not a valid .safetensors file ({e}); the file may be "
                            "truncated or corrupt: download or save it again") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._entries = header
        self._data_start = 8 + n
        data_size = size - self._data_start
        for key, entry in header.items():
            begin, end = entry["data_offsets"]
            if end > data_size:
                raise UserError(f"{self.path} is truncated: tensor {key!r} ends at byte "
                                f"{self._data_start + end} but the file has {size} bytes; "
                                "download or save it again")
            if entry["dtype"] not in _NUMPY_DTYPES and entry["dtype"] != "BF16":
                raise UserError(f"{self.path}: tensor {key!r} has unsupported dtype "
                                f"{entry['dtype']}")
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r") if header else None

    def keys(self):
        return list(self._entries)

    def shape(self, key):
        return tuple(self._entries[key]["shape"])

    def dtype(self, key):
        return self._entries[key]["dtype"]

    def get(self, key):
        entry = self._entries[key]
        begin, end = entry["data_offsets"]
        raw = self._map[self._data_start + begin:self._data_start + end]
        if entry["dtype"] == "BF16":
            bits = raw.view(np.uint16).astype(np.uint32) << 16
            arr = bits.view(np.float32)
        else:
            arr = raw.view(_NUMPY_DTYPES[entry["dtype"]])
        return arr.reshape(entry["shape"])


def float32_to_bfloat16_bits(arr):
    """Round float32 to bfloat16 (nearest, ties to even) and return the raw uint16 bits."""
    bits = np.ascontiguousarray(arr, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + 0x7FFF
    rounded = ((bits + rounding) >> 16).astype(np.uint16)
    # NaN must stay NaN (rounding could carry it into infinity).
    return np.where(np.isnan(arr), np.uint16(0x7FC0), rounded)


def encode_tensor(arr, dtype=None):
    """(code, bytes) for one tensor; `dtype` (float16/bfloat16/float32) applies to float tensors."""
    arr = np.asarray(arr)
    if arr.dtype.name == "bfloat16":          # an ml_dtypes array, e.g. from Tensor.asnumpy()
        arr = arr.astype(np.float32)
    if dtype and np.issubdtype(arr.dtype, np.floating):
        if dtype == "bfloat16":
            return "BF16", float32_to_bfloat16_bits(arr).tobytes()
        arr = arr.astype(dtype)
    arr = np.ascontiguousarray(arr)
    if arr.dtype not in _CODES:
        raise ValueError(f"cannot store numpy dtype {arr.dtype} in safetensors")
    return _CODES[arr.dtype], arr.tobytes()


def write_safetensors(path, tensors, metadata=None, dtype=None):
    """Write `tensors` (name -> array) atomically: a temp file in the same folder, then rename.

    `dtype` ("float32", "float16" or "bfloat16", or a dict of them per tensor name) converts
    floating tensors; integer tensors keep their type. `metadata` values must be strings (the format's rule).
    """
    header, chunks, offset = {}, [], 0
    encoded = {name: encode_tensor(arr, dtype.get(name) if isinstance(dtype, dict) else dtype)
               for name, arr in tensors.items()}
    for name in sorted(encoded, key=lambda n: (-DTYPE_RANK[encoded[n][0]], n)):
        code, data = encoded[name]
        header[name] = {"dtype": code, "shape": list(np.shape(tensors[name])),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(v, str)]
        if bad:
            raise ValueError(f"safetensors metadata values must be strings: {bad}")
        header["__metadata__"] = dict(metadata)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)           # keep tensor data 8-byte aligned
    write_atomically(path, [struct.pack("<Q", len(blob)), blob, *chunks])


def write_atomically(path, chunks):
    """Write byte chunks to `path` so that a crash never leaves a partial file under that name."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    # the pid lets a later run tell a killed writer's leftover from a live one's file
    # (library.training.saving.remove_stale_temp)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{os.getpid()}-", suffix=os.path.basename(path),
                               dir=folder)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)   # mkstemp makes 0600; give the file normal permissions
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
