"""One training example, as kohya's dataset `__getitem__` makes it: the image (or its cached
latent) cropped, flipped and colour-augmented into its bucket, the processed caption, SDXL's size
conditioning, and the mask in the example's geometry. Every random draw comes from the
example's own `random.Random` (`sample_rng`), so any worker process makes the same example.
"""

import random

import numpy as np

from library.data import images
from library.data.buckets import size_conditioning
from library.data.captions import process_caption
from library.errors import UserError


def sample_rng(seed, epoch, batch_index, slot):
    """The RNG of one sample; string seeds hash with SHA-512, the same in every process."""
    return random.Random(f"sample:{seed}:{epoch}:{batch_index}:{slot}")


def conditioning(record, config, crop_xy=None, flipped=False):
    """(original_size_hw, crop_top_left, target_size_hw) of a record, given the (left, top)
    really cropped (None: the centre crop, i.e. the value without random_crop)."""
    bucket = record.bucket
    w, h = record.original_wh
    if config.enable_bucket:
        if crop_xy is None:
            crop_xy = images.centre_crop_xy(bucket.resized_wh, bucket.bucket_wh)
        return size_conditioning(record.original_wh, bucket.bucket_wh, bucket.resized_wh, crop_xy, flipped,
                                 config.true_crop_top_left)
    # bucketing off: kohya uses the image unresized; its conditioning is the cropped size and (0, 0)
    rw, rh = config.resolution
    if not config.true_crop_top_left:
        return (rh, rw), (0, 0), (rh, rw)
    left, top = crop_xy if crop_xy is not None else images.centre_crop_xy((w, h), (rw, rh))
    if flipped:
        left = w - rw - left
    return (h, w), (top, left), (rh, rw)


def load_sample(record, config, rng, epoch=1, step=0, max_train_steps=0, latent_cache=None):
    """One training sample as a dict of numpy arrays and plain values:

    image            uint8 HWC RGB, the bucket's size (BatchLoader turns it into float32 CHW in
                     [-1, 1] in the training process: uint8 is a quarter of the bytes to send
                     from a worker)
    alpha_mask       float32 HW in [0, 1] when the subset has masks (alpha_mask: the image's alpha
                     channel; conditioning_data_dir: the mask image's R channel, as kohya), else None
    caption          the processed caption (shuffle, dropout, wildcards, ... applied)
    original_size_hw, crop_top_left, target_size_hw   SDXL's size conditioning (ints)
    flipped, path, is_reg, loss_weight (prior_loss_weight for reg images), network_multiplier,
    custom_attributes, bucket_wh

    Random draws follow kohya's order: flip, crop, colour, then caption.

    With a `latent_cache` (library.data.cache.latents.LatentCache) the image is not decoded: `image` is
    None and `latents` holds the cached float32 (C, h, w) latent (the flipped one when flipped),
    `alpha_mask` the cached mask. Captions and conditioning are the same as without the cache.
    """
    subset = record.subset
    flipped = subset.flip_aug and rng.random() < 0.5
    if latent_cache is not None:
        orig_hw, crop_tl, target_hw = conditioning(record, config, None, flipped)
        return _sample(record, config, None, latent_cache.alpha_mask(record, flipped),
                       process_caption(record.caption, subset.caption, rng, epoch, step, max_train_steps),
                       orig_hw, crop_tl, target_hw, flipped, latents=latent_cache.get(record, flipped))
    img = images.load_image(record.path, alpha=subset.alpha_mask)
    h, w = img.shape[:2]
    if (w, h) != tuple(record.original_wh):
        raise UserError(f"image {record.path} changed size since the dataset was built ({record.original_wh} -> {(w, h)})")
    mask = load_mask(record, config)
    bucket = record.bucket
    if config.enable_bucket:
        img, crop_xy = images.trim_and_resize(img, bucket.bucket_wh, bucket.resized_wh, rng, subset.random_crop,
                                              subset.resize_interpolation or config.resize_interpolation)
    else:
        img, crop_xy = images.crop_fixed(img, config.resolution, rng)
    orig_hw, crop_tl, target_hw = conditioning(record, config, crop_xy, flipped)
    if subset.color_aug:
        img = img.copy()
        img[..., :3] = images.color_aug(np.ascontiguousarray(img[..., :3]), rng)
    if flipped:
        img = img[:, ::-1]
        mask = None if mask is None else np.ascontiguousarray(mask[:, ::-1])
    alpha = img[..., 3].astype(np.float32) / 255.0 if subset.alpha_mask else mask
    caption = process_caption(record.caption, subset.caption, rng, epoch, step, max_train_steps)
    return _sample(record, config, np.ascontiguousarray(img[..., :3]), alpha, caption, orig_hw, crop_tl, target_hw,
                   flipped)


def load_mask(record, config):
    """The mask image of `record` (conditioning_data_dir) as float32 HW in [0, 1], in the geometry
    of the image's sample: resized and centre-cropped into the bucket (mask subsets have no
    random_crop) with the image's filter; None when it has none. kohya uses its R channel.

    It is resized on its own, not as the image's alpha channel: PIL resizes RGBA premultiplied,
    which would blacken the image wherever the mask is 0. (kohya stretches the mask to the bucket
    without the crop, which misaligns it when the bucket's aspect differs from the image's.)"""
    if record.mask_path is None:
        return None
    mask = np.ascontiguousarray(images.load_image(record.mask_path)[..., 0])
    if (mask.shape[1], mask.shape[0]) != tuple(record.original_wh):
        raise UserError(f"mask image {record.mask_path} changed size since the dataset was built; it must be "
                        f"{record.original_wh[0]}x{record.original_wh[1]} like {record.path}")
    if config.enable_bucket:
        b = record.bucket
        mask, _ = images.trim_and_resize(mask, b.bucket_wh, b.resized_wh, random.Random(0), False,
                                         record.subset.resize_interpolation or config.resize_interpolation)
    return mask.astype(np.float32) / 255.0


def _sample(record, config, image, alpha, caption, orig_hw, crop_tl, target_hw, flipped, latents=None):
    sample = {
        "image": image,
        "alpha_mask": alpha,
        "caption": caption,
        "original_size_hw": orig_hw,
        "crop_top_left": crop_tl,
        "target_size_hw": target_hw,
        "flipped": flipped,
        "path": record.path,
        "is_reg": record.is_reg,
        "loss_weight": config.prior_loss_weight if record.is_reg else 1.0,
        "network_multiplier": config.network_multiplier,
        "custom_attributes": record.subset.custom_attributes,
        "bucket_wh": record.bucket.bucket_wh,
    }
    if latents is not None:
        sample["latents"] = latents
    return sample
