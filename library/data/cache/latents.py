"""The latent cache: kohya's VAE latents of every image of a dataset group, in memory or in npz
files beside the images, encoded in kohya's batches and order."""

import logging
import random
from collections import OrderedDict

import numpy as np
from tqdm import tqdm

from library.data import images
from library.data.cache.exchange import SingleProcess, agree_on_hits, barrier, exchange
from library.data.cache.files import is_valid, read_cache_file, update_files
from library.data.cache.keys import canonical, entry_id, image_identity, latent_key, latents_path
from library.data.examples import load_mask
from library.errors import UserError

logger = logging.getLogger("library.data.cache")


class LatentCache:
    """Latents for every record of a dataset group: `get(record, flipped)` -> float32
    (C, h, w), unscaled (multiply by the VAE's scaling_factor before the UNet, as kohya);
    `alpha_mask(record, flipped)` -> float32 (h, w) in [0, 1], or None.

    In memory (--cache_latents) the arrays are held here; on disk (--cache_latents_to_disk)
    they are read from the file at each `get`, and their key is checked again.

    Counters: `hits` (entries found valid on disk), `computed` (entries encoded), `corrupt`
    (unreadable files met, recomputed), `encoded_images` (VAE passes, flips included).
    """

    def __init__(self, to_disk):
        self.to_disk = to_disk
        self._index = {}        # lookup key of a record -> (path, entry id, key json)
        self._memory = {}       # entry id -> {kind: array}
        self.hits = self.computed = self.corrupt = self.encoded_images = 0

    @staticmethod
    def _lookup(record):
        # a subset's `where` names its dataset and position, so this is unique within a group
        return record.path, record.subset.where, tuple(record.bucket.bucket_wh)

    def __len__(self):
        return len(self._index)

    # -- filled by build_latent_cache --
    def place(self, record, path, eid, key_json):
        """`record`'s latent is the entry `eid` (with this key) of the file `path`."""
        self._index[self._lookup(record)] = (path, eid, key_json)

    def holds(self, eid):
        return eid in self._memory

    def keep(self, eid, entry):
        self._memory[eid] = entry

    def num_entries(self):
        """Distinct entries (byte-identical images share one)."""
        return len({eid for _, eid, _ in self._index.values()})

    def _entry(self, record):
        try:
            path, eid, key_json = self._index[self._lookup(record)]
        except KeyError:
            raise KeyError(f"no cached latent for {record.path} (bucket {record.bucket.bucket_wh})") from None
        if not self.to_disk:
            return self._memory[eid]
        entries = read_cache_file(path)
        entry = (entries or {}).get(eid)
        if not is_valid(entry, key_json, ("latents",)):
            raise UserError(f"latent cache file {path} changed or broke during training; delete it and restart")
        return entry

    def get(self, record, flipped=False):
        entry = self._entry(record)
        kind = "latents_flipped" if flipped else "latents"
        get = entry.array if self.to_disk else entry.__getitem__
        if flipped and not (entry.has(kind) if self.to_disk else kind in entry):
            raise KeyError(f"no flipped latent cached for {record.path}: its subset has no flip_aug")
        return np.asarray(get(kind), dtype=np.float32)

    def alpha_mask(self, record, flipped=False):
        if not record.subset.masked:
            return None
        entry = self._entry(record)
        mask = entry.array("alpha_mask") if self.to_disk else entry["alpha_mask"]
        return np.ascontiguousarray(mask[:, ::-1]) if flipped else np.asarray(mask)


def _load_for_latent(record, config):
    """The image as the latent cache encodes it: resized and centre-cropped into the bucket
    (uint8 HWC, RGBA when the subset uses alpha_mask), and its mask (float32 HW in [0, 1], the
    alpha channel or the mask image) or None."""
    img = images.load_image(record.path, alpha=record.subset.alpha_mask)
    h, w = img.shape[:2]
    if (w, h) != tuple(record.original_wh):
        raise UserError(f"image {record.path} changed size since the dataset was built ({record.original_wh} -> {(w, h)})")
    if config.enable_bucket:
        b = record.bucket
        img, _ = images.trim_and_resize(img, b.bucket_wh, b.resized_wh, random.Random(0), False,
                                        record.subset.resize_interpolation or config.resize_interpolation)
    if record.subset.alpha_mask:
        return img, img[..., 3].astype(np.float32) / 255.0
    return img, load_mask(record, config)


def _encode_latent_batch(batch, encode, cache):
    """[latents (B, C, h, w), flipped latents with flip_aug, masks (B, H, W) with alpha_mask or
    mask images] for one encode batch of (entry id, (record, config, path, key json))."""
    loaded = [_load_for_latent(item[0], item[1]) for _, item in batch]
    rgb = np.stack([im[..., :3] for im, _ in loaded])
    seeds = [int(eid, 16) for eid, _ in batch]
    out = [np.asarray(encode(rgb, seeds), dtype=np.float32)]
    cache.encoded_images += len(batch)
    subset = batch[0][1][0].subset
    if subset.flip_aug:
        out.append(np.asarray(encode(np.ascontiguousarray(rgb[:, :, ::-1]), [s ^ 1 for s in seeds]), np.float32))
        cache.encoded_images += len(batch)
    if subset.masked:
        out.append(np.stack([mask for _, mask in loaded]))
    return out


def build_latent_cache(group, encode, model_id, to_disk=False, batch_size=1, skip_cache_check=False,
                       progress=True, cache=None, share=None):
    """Fill a LatentCache for every record of `group` (a DatasetGroup).

    encode(images, seeds) -> float32 (B, C, h, w): `images` uint8 (B, H, W, 3) of one bucket,
    `seeds` one int per image for the noise of its latent sample (derived from the entry key,
    so a latent does not depend on the batch it was encoded in).
    model_id: a string identifying the VAE weights (library.training.cache_encoders.model_identity).
    Images are encoded in batches of at most `batch_size` that share a bucket, flip_aug and
    alpha_mask, sorted by bucket area (kohya's order), behind a tqdm progress bar.
    share: the data-parallel ranks (see the module docstring); SingleProcess() by default.
    """
    cache = cache or LatentCache(to_disk)
    share = share or SingleProcess()
    hit_ids = set()
    todo = OrderedDict()                 # entry id -> (record, config, path, key)
    wanted = {}                          # path -> set of entry ids this run uses
    files = {}                           # path -> read_cache_file result
    for di, record in group.records():
        config = group.datasets[di].config
        content = image_identity(record.path, skip_cache_check)
        if record.mask_path is not None:
            content["mask"] = image_identity(record.mask_path, skip_cache_check)
        key = latent_key(record, config, model_id, content)
        eid, key_json = entry_id(key), canonical(key)
        path = latents_path(record)
        cache.place(record, path, eid, key_json)
        wanted.setdefault(path, set()).add(eid)
        if eid in todo:
            # a byte-identical image (copied into several repeat folders): its latent is the
            # entry of the first copy, read from that copy's file
            cache.place(record, todo[eid][2], eid, key_json)
            continue
        if cache.holds(eid):
            continue
        if to_disk:
            if path not in files:
                files[path] = read_cache_file(path)
                if files[path] is None:
                    cache.corrupt += 1
            kinds = ["latents"] + (["latents_flipped"] if record.subset.flip_aug else []) + \
                    (["alpha_mask"] if record.subset.masked else [])
            if is_valid((files[path] or {}).get(eid), key_json, kinds):
                hit_ids.add(eid)
        todo[eid] = (record, config, path, key_json)
    if to_disk:
        cache.hits += agree_on_hits(share, todo, hit_ids)

    # kohya: sort by bucket area, batch images that share (bucket, flip_aug, alpha_mask)
    order = sorted(todo.items(), key=lambda kv: (kv[1][0].bucket.bucket_wh[0] * kv[1][0].bucket.bucket_wh[1],
                                                 tuple(kv[1][0].bucket.bucket_wh)))
    batches, current, cond = [], [], None
    for eid, item in order:
        record = item[0]
        c = (tuple(record.bucket.bucket_wh) if item[1].enable_bucket else tuple(item[1].resolution),
             record.subset.flip_aug, record.subset.masked)
        if current and (c != cond or len(current) >= batch_size):
            batches.append(current)
            current = []
        current.append((eid, item))
        cond = c
    if current:
        batches.append(current)

    with tqdm(total=len(todo), desc="caching latents", unit="img",
              disable=not progress or not todo or share.rank != 0) as bar:
        for start in range(0, len(batches), share.size):
            rnd = batches[start:start + share.size]
            own = rnd[share.rank] if share.rank < len(rnd) else None
            payload = _encode_latent_batch(own, encode, cache) if own is not None else None
            for owner, batch in enumerate(rnd):
                first = batch[0][1][0]
                count = 1 + bool(first.subset.flip_aug) + bool(first.subset.masked)
                arrays = iter(exchange(share, owner, payload, count))
                latents = next(arrays)
                flipped = next(arrays) if first.subset.flip_aug else None
                masks = next(arrays) if first.subset.masked else None
                by_file = {}
                for i, (eid, (record, config, path, key_json)) in enumerate(batch):
                    entry = {"key": key_json, "latents": latents[i]}
                    if flipped is not None:
                        entry["latents_flipped"] = flipped[i]
                    if masks is not None:
                        entry["alpha_mask"] = masks[i]
                    if to_disk:
                        by_file.setdefault(path, {})[eid] = entry
                    else:
                        cache.keep(eid, entry)
                    cache.computed += 1
                update_files(share, by_file, wanted)
                bar.update(len(batch))
    if to_disk:
        barrier(share)      # every file is written before any rank reads it
    logger.info("latent cache: %d entries, %d from disk, %d computed%s", cache.num_entries(),
                cache.hits, cache.computed, f", {cache.corrupt} unreadable files recomputed" if cache.corrupt else "")
    return cache
