"""The text-encoder output cache: the context and pooled vector of every distinct caption of a
dataset group, in memory or in npz files beside the images."""

import logging
from collections import OrderedDict

import numpy as np
from tqdm import tqdm

from library.data.cache.exchange import SingleProcess, agree_on_hits, barrier, exchange
from library.data.cache.files import is_valid, read_cache_file, update_files
from library.data.cache.keys import cached_caption, canonical, entry_id, text_key, text_path
from library.errors import UserError

logger = logging.getLogger("library.data.cache")


class TextCache:
    """Text-encoder outputs for every record: `get(record)` -> (context float32 (L, 2048),
    pooled float32 (1280,)) for the record's caption (see `cached_caption`).

    Counters: `hits` (entries valid on disk), `computed` (entries filled by encoding),
    `encoded_captions` (distinct captions through the encoders), `corrupt` (unreadable files).
    """

    def __init__(self, to_disk):
        self.to_disk = to_disk
        self._index = {}       # (path, caption) -> (file path, entry id, key json)
        self._memory = {}      # entry id -> (context, pooled)
        self.hits = self.computed = self.corrupt = self.encoded_captions = 0

    def __len__(self):
        return len(self._index)

    # -- filled by build_text_cache --
    def place(self, image_path, caption, path, eid, key_json):
        """The output for this image's caption is the entry `eid` (with this key) of `path`."""
        self._index[(image_path, caption)] = (path, eid, key_json)

    def holds(self, eid):
        return eid in self._memory

    def keep(self, eid, context, pooled):
        self._memory[eid] = (context, pooled)

    def get(self, record):
        return self.get_caption(record.path, cached_caption(record))

    def get_caption(self, image_path, caption):
        try:
            path, eid, key_json = self._index[(image_path, caption)]
        except KeyError:
            raise KeyError(f"no cached text-encoder output for {image_path} with caption {caption!r}") from None
        if not self.to_disk:
            return self._memory[eid]
        entry = (read_cache_file(path) or {}).get(eid)
        if not is_valid(entry, key_json, ("context", "pooled")):
            raise UserError(f"text-encoder cache file {path} changed or broke during training; delete it and restart")
        return np.asarray(entry.array("context"), np.float32), np.asarray(entry.array("pooled"), np.float32)


def build_text_cache(group, encode, model_id, max_token_length=None, weighted=False, to_disk=False,
                     batch_size=None, progress=True, cache=None, share=None):
    """Fill a TextCache for every record of `group`.

    encode(captions) -> (context float32 (B, L, C), pooled float32 (B, P)); model_id identifies
    the two text encoders. A caption shared by several images (class tokens) is encoded once.
    Captions are encoded in batches of `batch_size` (default: the largest dataset batch_size,
    as kohya uses the dataset's). share: the data-parallel ranks (see the module docstring).
    """
    cache = cache or TextCache(to_disk)
    share = share or SingleProcess()
    batch_size = batch_size or max(ds.config.batch_size for ds in group.datasets)
    pending = OrderedDict()           # key json -> [(path, entry id, record path)]
    wanted, files = {}, {}
    for _, record in group.records():
        caption = cached_caption(record)
        key = text_key(caption, max_token_length, weighted, model_id)
        eid, key_json = entry_id(key), canonical(key)
        path = text_path(record)
        cache.place(record.path, caption, path, eid, key_json)
        wanted.setdefault(path, set()).add(eid)
        if to_disk:
            if path not in files:
                files[path] = read_cache_file(path)
                if files[path] is None:
                    cache.corrupt += 1
            valid = is_valid((files[path] or {}).get(eid), key_json, ("context", "pooled"))
            cache.hits += valid
        elif cache.holds(eid):
            continue
        # a caption stays pending with the files that lack it; with none, it is a hit
        targets = pending.setdefault(key_json, (caption, eid, []))[2]
        if not (to_disk and valid) and (path, eid) not in targets:
            targets.append((path, eid))
    if to_disk:
        agree_on_hits(share, pending, {k for k, (_, _, targets) in pending.items() if not targets})

    items = list(pending.items())
    chunks = [items[start:start + batch_size] for start in range(0, len(items), batch_size)]
    with tqdm(total=len(items), desc="caching text-encoder outputs", unit="caption",
              disable=not progress or not items or share.rank != 0) as bar:
        for start in range(0, len(chunks), share.size):
            rnd = chunks[start:start + share.size]
            payload = None
            if share.rank < len(rnd):
                payload = encode([caption for _, (caption, _, _) in rnd[share.rank]])
                cache.encoded_captions += len(rnd[share.rank])
            for owner, chunk in enumerate(rnd):
                context, pooled = exchange(share, owner, payload, 2)
                by_file = {}
                for i, (key_json, (_, eid, targets)) in enumerate(chunk):
                    if not to_disk:
                        cache.keep(eid, context[i], pooled[i])
                        cache.computed += 1
                        continue
                    for path, _ in targets:
                        by_file.setdefault(path, {})[eid] = {"key": key_json, "context": context[i], "pooled": pooled[i]}
                        cache.computed += 1
                update_files(share, by_file, wanted)
                bar.update(len(chunk))
    if to_disk:
        barrier(share)      # every file is written before any rank reads it
    logger.info("text-encoder output cache: %d entries, %d from disk, %d computed (%d captions encoded)%s",
                len(cache), cache.hits, cache.computed, cache.encoded_captions,
                f", {cache.corrupt} unreadable files recomputed" if cache.corrupt else "")
    return cache
