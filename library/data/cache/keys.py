"""What a cache entry depends on (its key, a JSON document; the entry's name is a hash of it) and
the kohya file names beside each image (the package docstring lists both)."""

import hashlib
import json
import os
import random

from library.data import images
from library.data.captions import process_caption

CACHE_FORMAT = 1
LATENTS_SUFFIX = "_sdxl.npz"
TEXT_SUFFIX = "_te_outputs.npz"


def entry_id(key):
    """The entry's name in a cache file: 16 hex digits of the SHA-256 of its canonical JSON key."""
    return hashlib.sha256(canonical(key).encode()).hexdigest()[:16]


def canonical(key):
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


def resize_filter(record, config):
    return record.subset.resize_interpolation or config.resize_interpolation or "auto"


def latent_key(record, config, model_id, content):
    """Everything a cached latent depends on (see the module docstring)."""
    b = record.bucket
    if config.enable_bucket:
        crop = [(b.resized_wh[0] - b.bucket_wh[0]) // 2, (b.resized_wh[1] - b.bucket_wh[1]) // 2]
        geometry = {"bucket_wh": list(b.bucket_wh), "resized_wh": list(b.resized_wh), "crop_xy": crop,
                    "interpolation": resize_filter(record, config)}
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
