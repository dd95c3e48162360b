"""The cache's npz files: entries read lazily and checked against their key, files written whole
under a temporary name and renamed, and a rewrite that keeps only the entries a run uses."""

import io
import logging
import os

import numpy as np

from library.safetensors_io import write_atomically

logger = logging.getLogger("library.data.cache")


def read_cache_file(path):
    """{entry id: {name: array}} of a cache file (arrays loaded lazily through `NpzFile`), {}
    when it does not exist, None with a warning when it cannot be read (it is then recomputed)."""
    if not os.path.exists(path):
        return {}
    try:
        npz = np.load(path, allow_pickle=False)
        entries = {}
        for name in npz.files:
            kind, _, eid = name.rpartition("_")
            entries.setdefault(eid, {})[kind] = name
        for eid, names in entries.items():
            if "key" not in names:
                raise ValueError(f"entry {eid} has no key")
            names["key"] = str(npz[names["key"]])
        return {eid: _LazyEntry(npz, names) for eid, names in entries.items()}
    except Exception as e:  # a truncated or corrupt file: any of zipfile's, zlib's or numpy's errors
        logger.warning("cache file %s cannot be read (%s: %s); its entries will be recomputed",
                       path, type(e).__name__, e)
        return None


class _LazyEntry:
    def __init__(self, npz, names):
        self.npz, self.names = npz, names

    @property
    def key(self):
        return self.names["key"]

    def has(self, kind):
        return kind in self.names

    def array(self, kind):
        return self.npz[self.names[kind]]


def write_cache_file(path, entries):
    """Write {entry id: {"key": json str, kind: array}} atomically (temp file + rename)."""
    arrays = {}
    for eid, entry in entries.items():
        for kind, value in entry.items():
            arrays[f"{kind}_{eid}"] = np.asarray(value)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_atomically(path, [buf.getvalue()])


def update_file(path, new_entries, wanted_ids):
    """Add `new_entries` to the file at `path`, keeping the existing entries this run uses
    (`wanted_ids`) and dropping the others."""
    existing = read_cache_file(path) or {}
    merged = {}
    for eid, entry in existing.items():
        if eid in wanted_ids and eid not in new_entries:
            merged[eid] = {"key": entry.key, **{k: entry.array(k) for k in entry.names if k != "key"}}
    merged.update(new_entries)
    write_cache_file(path, merged)


def update_files(share, by_file, wanted):
    """Write one encode batch's {path: {entry id: entry}} into their files, keeping the entries
    this run uses (`wanted`: path -> ids). One writer per node: its first worker."""
    if share.local_rank == 0:
        for path, new in by_file.items():
            update_file(path, new, wanted[path])


def is_valid(entry, key_json, kinds):
    return entry is not None and entry.key == key_json and all(entry.has(k) for k in kinds)
