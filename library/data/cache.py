"""Latent and text-encoder output caches (--cache_latents[_to_disk],
--cache_text_encoder_outputs[_to_disk]), keyed by their inputs.

Plain numpy: the models come in as encode functions (library/training/cache_encoders.py builds
them from the MindSpore cells), so this module is testable without a model.

Every cache entry has a key: a JSON document of everything its value depends on.

    latents       the image file's content (SHA-256 of its bytes), its size, the bucket, the
                  resized size and the crop, the resize filter, flip_aug, alpha_mask, the mask
                  image's content (conditioning_data_dir), the VAE (a hash of its weights) and
                  this file format's version
    text outputs  the caption text as encoded (after prefix/suffix), --max_token_length,
                  --weighted_captions, the two text encoders (a hash of their weights), version

An entry's name inside a file is a hash of its key, and the whole key is stored next to the
arrays and compared on every read. So a changed input is a miss, never a stale hit (kohya's bug
#1771), and several entries for one image (two [[datasets]] at different resolutions) live side
by side. Files are written whole to a temporary name and renamed, so a half-written file is
never read; a file that cannot be read is reported with a warning and recomputed.

Data parallel (msrun): every rank builds the same list of entries to compute, in the same
order, and the encode batches are dealt round-robin: rank r encodes batches r, r + N, ... Each
batch's arrays then reach every rank through an AllReduce(sum) to which the other ranks add
zeros (exact: x + 0 = x), so each rank ends with the whole cache, as a single process would,
having encoded 1/N of it. This works in memory and across nodes with no shared disk. With
*_to_disk, an entry counts as cached only if it is valid on every rank, and the first worker of
each node writes the files (the same bytes, atomically, if nodes share the folder); the ranks
then wait for each other before reading.

Disk files sit beside the images, with kohya's names:

    <image stem>_<WWWW>x<HHHH>_sdxl.npz     latents; W x H is the image's size (kohya's scheme)
    <image stem>_te_outputs.npz             text-encoder outputs

Inside, per entry <id> (16 hex digits): `key_<id>` (the JSON key), `latents_<id>` float32
(4, h/8, w/8) unscaled, `latents_flipped_<id>` with flip_aug, `alpha_mask_<id>` float32 (h, w)
with alpha_mask or mask images; or `context_<id>` float32 (L, 2048) and `pooled_<id>` float32
(1280,). When a run rewrites a file, it keeps only the entries that run uses, so stale entries
do not pile up.
"""

import hashlib
import io
import json
import logging
import os
import random
from collections import OrderedDict

import numpy as np
from tqdm import tqdm

from library.data import images
from library.data.captions import process_caption
from library.data.dataset import load_mask
from library.errors import UserError
from library.safetensors_io import write_atomically

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
LATENTS_SUFFIX = "_sdxl.npz"
TEXT_SUFFIX = "_te_outputs.npz"


# ---------------------------------------------------------------------------------- options
def add_cache_arguments(parser):
    """kohya's caching options (train_util / sdxl_train_util), same names and defaults."""
    a = parser.add_argument
    a("--cache_latents", action="store_true", help="encode every image once with the VAE before training (RAM)")
    a("--cache_latents_to_disk", action="store_true",
      help="cache latents in <image>_<W>x<H>_sdxl.npz beside the images; implies --cache_latents")
    a("--vae_batch_size", type=int, default=1, help="images per VAE call when caching latents")
    a("--skip_cache_check", action="store_true",
      help="identify images by file size and modification time instead of hashing their bytes")
    a("--cache_text_encoder_outputs", action="store_true",
      help="encode every caption once before training; needs --network_train_unet_only")
    a("--cache_text_encoder_outputs_to_disk", action="store_true",
      help="cache text-encoder outputs in <image>_te_outputs.npz; implies --cache_text_encoder_outputs")
    a("--weighted_captions", action="store_true",
      help="read captions with A1111 attention syntax, (word:1.2), [word], as kohya's training does")


# kohya refuses these with a cached latent (train_network.py: is_latent_cacheable)
LATENT_CONFLICTS = ("color_aug", "random_crop")


def _text_conflicts(subset):
    """The caption keys of a subset that make its encoded caption change between samples.
    kohya checks the first four (is_text_encoder_output_cacheable); it silently ignores the
    last two, encoding a caption no sample would see, so they are errors here."""
    c = subset.caption
    found = []
    if c.shuffle_caption:
        found.append("shuffle_caption")
    if c.caption_dropout_rate > 0:
        found.append(f"caption_dropout_rate = {c.caption_dropout_rate}")
    if c.caption_tag_dropout_rate > 0:
        found.append(f"caption_tag_dropout_rate = {c.caption_tag_dropout_rate}")
    if c.token_warmup_step > 0:
        found.append(f"token_warmup_step = {c.token_warmup_step}")
    if c.caption_dropout_every_n_epochs > 0:
        found.append(f"caption_dropout_every_n_epochs = {c.caption_dropout_every_n_epochs}")
    if c.enable_wildcard:
        found.append("enable_wildcard")
    return found


def check_cache_options(args, groups):
    """kohya's caching rules, applied to `args` and the dataset groups (train, validation).

    `--cache_latents_to_disk` turns on `--cache_latents` and `--cache_text_encoder_outputs_to_disk`
    turns on `--cache_text_encoder_outputs`, as in kohya (args is updated). A combination that
    makes a cache meaningless is a UserError listing every subset and key at fault.
    """
    if args.cache_latents_to_disk and not args.cache_latents:
        logger.info("--cache_latents_to_disk is set, so --cache_latents is on too")
        args.cache_latents = True
    if args.cache_text_encoder_outputs_to_disk and not args.cache_text_encoder_outputs:
        logger.info("--cache_text_encoder_outputs_to_disk is set, so --cache_text_encoder_outputs is on too")
        args.cache_text_encoder_outputs = True
    if getattr(args, "vae_batch_size", 1) < 1:
        raise UserError(f"--vae_batch_size {args.vae_batch_size} must be at least 1")
    subsets = [s for g in groups if g is not None for ds in g.datasets for s in ds.config.subsets]
    errors = []
    if args.cache_latents:
        flag = "--cache_latents_to_disk" if args.cache_latents_to_disk else "--cache_latents"
        for s in subsets:
            bad = [k for k in LATENT_CONFLICTS if getattr(s, k)]
            if bad:
                errors.append(f"{s.where}: {' and '.join(bad)} cannot be used with {flag}: a cached latent is one "
                              f"fixed encoding of the image. Turn off {' and '.join(bad)}, or drop {flag}")
    if args.cache_text_encoder_outputs:
        flag = "--cache_text_encoder_outputs" + ("_to_disk" if args.cache_text_encoder_outputs_to_disk else "")
        if not getattr(args, "network_train_unet_only", False):
            errors.append(f"{flag} needs --network_train_unet_only: the text encoders' LoRA cannot be trained on "
                          f"cached text-encoder outputs")
        for s in subsets:
            bad = _text_conflicts(s)
            if bad:
                errors.append(f"{s.where}: {', '.join(bad)} cannot be used with {flag}: the caption must be the same "
                              f"in every epoch to be encoded once. Remove {'it' if len(bad) == 1 else 'them'}, or drop "
                              f"{flag}")
    if errors:
        raise UserError("conflicting cache options:\n  " + "\n  ".join(errors))


# ---------------------------------------------------------------------------------- keys and files
def entry_id(key):
    """The entry's name in a cache file: 16 hex digits of the SHA-256 of its canonical JSON key."""
    return hashlib.sha256(_canonical(key).encode()).hexdigest()[:16]


def _canonical(key):
    return json.dumps(key, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def image_identity(path, skip_cache_check=False):
    """The content part of a latent key: the SHA-256 of the file, or with --skip_cache_check its
    size and modification time (cheaper; an edit that keeps both goes unnoticed)."""
    if skip_cache_check:
        st = os.stat(path)
        return {"image_stat": [st.st_size, st.st_mtime_ns]}
    return {"image_sha256": images.file_digest(path)}


def latents_path(record):
    """kohya's file name: `<stem>_<WWWW>x<HHHH>_sdxl.npz` beside the image, W x H its size."""
    w, h = record.original_wh
    return os.path.splitext(record.path)[0] + f"_{w:04d}x{h:04d}" + LATENTS_SUFFIX


def text_path(record):
    """kohya's file name: `<stem>_te_outputs.npz` beside the image."""
    return os.path.splitext(record.path)[0] + TEXT_SUFFIX


def _interpolation(record, config):
    return record.subset.resize_interpolation or config.resize_interpolation or "auto"


def latent_key(record, config, model_id, content):
    """Everything a cached latent depends on (see the module docstring)."""
    b = record.bucket
    if config.enable_bucket:
        crop = [(b.resized_wh[0] - b.bucket_wh[0]) // 2, (b.resized_wh[1] - b.bucket_wh[1]) // 2]
        geometry = {"bucket_wh": list(b.bucket_wh), "resized_wh": list(b.resized_wh), "crop_xy": crop,
                    "interpolation": _interpolation(record, config)}
    else:
        geometry = {"bucket_wh": list(config.resolution), "resized_wh": list(record.original_wh), "crop_xy": [0, 0]}
    return {"kind": "sdxl_latents", "format": CACHE_FORMAT, **content, "original_wh": list(record.original_wh),
            **geometry, "flip_aug": bool(record.subset.flip_aug), "alpha_mask": bool(record.subset.alpha_mask),
            "vae": model_id}


def cached_caption(record):
    """The caption a text-encoder cache encodes: the record's caption after the (static) caption
    processing, i.e. what every sample would be given. kohya encodes the raw caption and so
    ignores caption_prefix, caption_suffix and secondary_separator; here they apply."""
    return process_caption(record.caption, record.subset.caption, random.Random(0), epoch=1, step=0)


def text_key(caption, max_token_length, weighted, model_id):
    return {"kind": "sdxl_text_encoder_outputs", "format": CACHE_FORMAT, "caption": caption,
            "max_token_length": max_token_length, "weighted_captions": bool(weighted), "text_encoders": model_id}


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


def _update_file(path, new_entries, wanted_ids):
    """Add `new_entries` to the file at `path`, keeping the existing entries this run uses
    (`wanted_ids`) and dropping the others."""
    existing = read_cache_file(path) or {}
    merged = {}
    for eid, entry in existing.items():
        if eid in wanted_ids and eid not in new_entries:
            merged[eid] = {"key": entry.key, **{k: entry.array(k) for k in entry.names if k != "key"}}
    merged.update(new_entries)
    write_cache_file(path, merged)


def _valid(entry, key_json, kinds):
    return entry is not None and entry.key == key_json and all(entry.has(k) for k in kinds)


# ---------------------------------------------------------------------------------- data parallel
class SingleProcess:
    """The `share` of a run on one process. A data-parallel run passes an object with the same
    attributes (rank, size, local_rank) and all_reduce_sum(float32 array) -> the sum over ranks
    (library.training.cache_encoders.RankShare)."""
    rank, size, local_rank = 0, 1, 0

    @staticmethod
    def all_reduce_sum(array):
        return np.asarray(array, np.float32)


_MAX_DIMS = 8


def _exchange(share, owner, arrays, count):
    """Rank `owner`'s `count` float32 arrays, on every rank (`arrays` is ignored elsewhere):
    each array's shape, then its values, through an AllReduce(sum) where the others add zeros."""
    if share.size == 1:
        return [np.asarray(a, np.float32) for a in arrays]
    mine = share.rank == owner
    out = []
    for i in range(count):
        header = np.zeros(_MAX_DIMS + 1, np.float32)
        if mine:
            a = np.ascontiguousarray(arrays[i], np.float32)
            header[0], header[1:1 + a.ndim] = a.ndim, a.shape
        header = share.all_reduce_sum(header)
        shape = tuple(int(d) for d in header[1:1 + int(header[0])])
        out.append(share.all_reduce_sum(a if mine else np.zeros(shape, np.float32)).reshape(shape))
    return out


def _agree_on_hits(share, todo, hit_ids):
    """Drop from `todo` the entries valid on disk on every rank; returns how many were dropped.
    All ranks then compute the same list (a node with a stale file recomputes for everyone)."""
    misses = np.array([0.0 if eid in hit_ids else 1.0 for eid in todo], np.float32)
    if share.size > 1 and len(misses):
        misses = share.all_reduce_sum(misses)
    hits = [eid for eid, m in zip(list(todo), misses) if m == 0]
    for eid in hits:
        del todo[eid]
    return len(hits)


def _barrier(share):
    if share.size > 1:
        share.all_reduce_sum(np.zeros(1, np.float32))


# ---------------------------------------------------------------------------------- latents
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

    def _entry(self, record):
        try:
            path, eid, key_json = self._index[self._lookup(record)]
        except KeyError:
            raise KeyError(f"no cached latent for {record.path} (bucket {record.bucket.bucket_wh})") from None
        if not self.to_disk:
            return self._memory[eid]
        entries = read_cache_file(path)
        entry = (entries or {}).get(eid)
        if not _valid(entry, key_json, ("latents",)):
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
        eid, key_json = entry_id(key), _canonical(key)
        path = latents_path(record)
        cache._index[cache._lookup(record)] = (path, eid, key_json)
        wanted.setdefault(path, set()).add(eid)
        if eid in todo:
            # a byte-identical image (copied into several repeat folders): its latent is the
            # entry of the first copy, read from that copy's file
            cache._index[cache._lookup(record)] = (todo[eid][2], eid, key_json)
            continue
        if eid in cache._memory:
            continue
        if to_disk:
            if path not in files:
                files[path] = read_cache_file(path)
                if files[path] is None:
                    cache.corrupt += 1
            kinds = ["latents"] + (["latents_flipped"] if record.subset.flip_aug else []) + \
                    (["alpha_mask"] if record.subset.masked else [])
            if _valid((files[path] or {}).get(eid), key_json, kinds):
                hit_ids.add(eid)
        todo[eid] = (record, config, path, key_json)
    if to_disk:
        cache.hits += _agree_on_hits(share, todo, hit_ids)

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
                arrays = iter(_exchange(share, owner, payload, count))
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
                        cache._memory[eid] = entry
                    cache.computed += 1
                if share.local_rank == 0:     # one writer per node
                    for path, new in by_file.items():
                        _update_file(path, new, wanted[path])
                bar.update(len(batch))
    if to_disk:
        _barrier(share)      # every file is written before any rank reads it
    logger.info("latent cache: %d entries, %d from disk, %d computed%s", len(set(e for _, e, _ in cache._index.values())),
                cache.hits, cache.computed, f", {cache.corrupt} unreadable files recomputed" if cache.corrupt else "")
    return cache


# ---------------------------------------------------------------------------------- text encoders
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
        if not _valid(entry, key_json, ("context", "pooled")):
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
        eid, key_json = entry_id(key), _canonical(key)
        path = text_path(record)
        cache._index[(record.path, caption)] = (path, eid, key_json)
        wanted.setdefault(path, set()).add(eid)
        if to_disk:
            if path not in files:
                files[path] = read_cache_file(path)
                if files[path] is None:
                    cache.corrupt += 1
            valid = _valid((files[path] or {}).get(eid), key_json, ("context", "pooled"))
            cache.hits += valid
        elif eid in cache._memory:
            continue
        # a caption stays pending with the files that lack it; with none, it is a hit
        targets = pending.setdefault(key_json, (caption, eid, []))[2]
        if not (to_disk and valid) and (path, eid) not in targets:
            targets.append((path, eid))
    if to_disk:
        _agree_on_hits(share, pending, {k for k, (_, _, targets) in pending.items() if not targets})

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
                context, pooled = _exchange(share, owner, payload, 2)
                by_file = {}
                for i, (key_json, (_, eid, targets)) in enumerate(chunk):
                    if not to_disk:
                        cache._memory[eid] = (context[i], pooled[i])
                        cache.computed += 1
                        continue
                    for path, _ in targets:
                        by_file.setdefault(path, {})[eid] = {"key": key_json, "context": context[i], "pooled": pooled[i]}
                        cache.computed += 1
                if share.local_rank == 0:     # one writer per node
                    for path, new in by_file.items():
                        _update_file(path, new, wanted[path])
                bar.update(len(chunk))
    if to_disk:
        _barrier(share)      # every file is written before any rank reads it
    logger.info("text-encoder output cache: %d entries, %d from disk, %d computed (%d captions encoded)%s",
                len(cache), cache.hits, cache.computed, cache.encoded_captions,
                f", {cache.corrupt} unreadable files recomputed" if cache.corrupt else "")
    return cache
