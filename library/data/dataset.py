"""The dataset group: image records, buckets, regularisation balancing, epoch batch order (each
example of a batch is made by library/data/examples.py).

    configs = resolve_dataset_configs(args)                 # library.data.config
    train, val = build_dataset_groups(configs, seed=args.seed)
    train.bucket_shapes()                                   # [(w, h), ...] to compile for
    train.epoch_batches(seed, epoch=1)                      # [(dataset_index, [record_index, ...]), ...]
    BatchLoader(train, seed).epoch(1)                       # library.data.loader: the decoded batches

Batches never mix buckets. The order of an epoch is a pure function of (seed, epoch), so a
resumed run continues exactly where it stopped (see library.data.loader for the position
state). Everything random in a sample (flip, random crop, colour, caption) comes from a
`random.Random` seeded by (seed, epoch, batch index, slot), so the same run gives the same
samples whichever worker decodes them.
"""

import json
import logging
import math
import os
import random
from dataclasses import dataclass

import numpy as np

from library.data import images
from library.data.buckets import BucketChoice, BucketSelector, adjust_min_max_bucket_reso
from library.data.captions import metadata_caption, metadata_tags, read_caption_file
from library.errors import UserError, read_utf8

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageRecord:
    """One image as the dataset uses it. `caption` is the raw caption (before per-sample
    processing); `num_repeats` is after regularisation balancing."""

    path: str
    caption: str
    subset: object            # SubsetConfig
    is_reg: bool
    num_repeats: int
    original_wh: tuple        # after the EXIF orientation
    bucket: BucketChoice
    mask_path: str = None     # its mask image, for a subset with conditioning_data_dir


class Dataset:
    """One [[datasets]] table: its records and buckets (kohya's DreamBoothDataset /
    FineTuningDataset after make_buckets)."""

    def __init__(self, config, records, num_train_images, num_reg_images, unused_reg_images, skipped_corrupt,
                 subset_images=None):
        self.config = config
        # per subset, in config order: (subset, img_count, the texts kohya counts for ss_tag_frequency);
        # every image of the subset, also regularisation images the balancing leaves unused
        self.subset_images = subset_images or []
        self.records = records
        self.num_train_images = num_train_images        # with repeats
        self.num_reg_images = num_reg_images            # with repeats, before balancing (kohya's ss_num_reg_images)
        self.unused_reg_images = unused_reg_images      # reg images the first-N rule leaves out
        self.skipped_corrupt = skipped_corrupt          # paths left out by --skip_corrupt_images
        self.buckets = {}                               # bucket (w, h) -> record indices, one per repeat
        for i, rec in enumerate(records):
            self.buckets.setdefault(rec.bucket.bucket_wh, []).extend([i] * rec.num_repeats)

    def num_batches(self):
        bs = self.config.batch_size
        return sum(math.ceil(len(v) / bs) for v in self.buckets.values())

    def mean_ar_error(self):
        """kohya's "mean ar error (without repeats)"."""
        if not self.records:
            return 0.0
        return float(np.mean([abs(r.bucket.ar_error) for r in self.records]))


class DatasetGroup:
    """All datasets of a run (kohya's DatasetGroup)."""

    def __init__(self, datasets):
        self.datasets = datasets

    def bucket_shapes(self):
        """Every batch shape (w, h) the run will see, sorted: compile the train step for these."""
        return sorted({shape for ds in self.datasets for shape in ds.buckets})

    def num_batches(self):
        return sum(ds.num_batches() for ds in self.datasets)

    def num_samples(self):
        """Samples per epoch, repeats and balanced reg images included."""
        return sum(len(v) for ds in self.datasets for v in ds.buckets.values())

    def records(self):
        """(dataset_index, record) for every distinct image, e.g. to fill latent caches."""
        return [(i, r) for i, ds in enumerate(self.datasets) for r in ds.records]

    def is_latent_cacheable(self):
        """kohya's rule: latents can be cached unless a subset uses color_aug or random_crop."""
        return all(not (s.color_aug or s.random_crop) for ds in self.datasets for s in ds.config.subsets)

    def is_text_encoder_output_cacheable(self):
        """True when no caption can change between samples (no shuffle, dropout, warmup, wildcard)."""
        return all(s.caption.is_static() for ds in self.datasets for s in ds.config.subsets)

    def epoch_batches(self, seed, epoch):
        """The epoch's batches in order: a list of (dataset_index, [record_index, ...]).

        Like kohya, each bucket's samples are shuffled, cut into batch_size batches (the last may
        be short), and the batches of all buckets and datasets are shuffled together. The
        permutation is a pure function of (seed, epoch); it is not kohya's, whose order also
        depends on torch's sampler (see docs/dataset.md).
        """
        rng = random.Random(f"order:{seed}:{epoch}")
        batches = []
        for di, ds in enumerate(self.datasets):
            bs = ds.config.batch_size
            for shape in sorted(ds.buckets):
                items = list(ds.buckets[shape])
                rng.shuffle(items)
                batches.extend((di, items[k:k + bs]) for k in range(0, len(items), bs))
        rng.shuffle(batches)
        return batches


def _mask_files(subset, entries):
    """{image path: mask path} for a subset with conditioning_data_dir: each image's mask is the
    image file of that folder with the same stem, of the same size. As kohya, an image without a
    mask and a mask without an image are errors; all of them are listed in one message."""
    folder = subset.conditioning_data_dir
    if not os.path.isdir(folder):
        raise UserError(f"{subset.where}: conditioning_data_dir {folder} does not exist or is not a directory")
    by_stem = {}
    for path in images.list_images(folder):
        by_stem.setdefault(os.path.splitext(os.path.basename(path))[0], path)
    found, missing, wrong_size = {}, [], []
    sizes = {p: images.image_size(p) for p in by_stem.values()}
    for path, _, _, wh in entries:
        mask = by_stem.pop(os.path.splitext(os.path.basename(path))[0], None)
        if mask is None:
            missing.append(os.path.basename(path))
        elif tuple(sizes[mask]) != tuple(wh):
            wrong_size.append(f"{os.path.basename(mask)} is {sizes[mask][0]}x{sizes[mask][1]}, "
                              f"its image {wh[0]}x{wh[1]}")
        else:
            found[path] = mask
    problems = []
    if missing:
        problems.append(f"{len(missing)} images have no mask image of the same name in {folder}: "
                        f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if by_stem:
        extra = sorted(os.path.basename(p) for p in by_stem.values())
        problems.append(f"{len(extra)} mask images in {folder} have no image in {subset.image_dir}: "
                        f"{', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
    if wrong_size:
        problems.append(f"mask images must have their image's size: {'; '.join(wrong_size[:5])}")
    if problems:
        raise UserError(f"{subset.where}: " + ". ".join(problems))
    return found


# ---------------------------------------------------------------------------------- building
def build_dataset_groups(configs, seed=0, bucket_reso_multiple=32):
    """(train DatasetGroup, validation DatasetGroup or None) from resolved DatasetConfigs.

    bucket_reso_multiple: what bucket_reso_steps must divide into; 32 for SDXL, as kohya's
    sdxl_train_network checks. `seed` shuffles the validation split when a dataset has no
    validation_seed (kohya then uses unseeded global state, so its train and validation sets
    overlap; here they never do).
    """
    train, val = [], []
    for config in configs:
        if config.enable_bucket and config.bucket_reso_steps % bucket_reso_multiple:
            raise UserError(f"{config.where}: `bucket_reso_steps` = {config.bucket_reso_steps} must be a multiple of "
                            f"{bucket_reso_multiple} for SDXL (kohya's default is 64)")
        split_seed = config.validation_seed if config.validation_seed is not None else seed
        train.append(_build_dataset(config, "train", split_seed))
        if config.validation_split > 0:
            held_out = _build_dataset(config, "validation", split_seed)
            if held_out.records:
                val.append(held_out)
            else:
                logger.warning("%s: validation_split %g holds out no image (kohya keeps round(n x "
                               "split) per subset)", config.where, config.validation_split)
    if any(c.validation_split > 0 for c in configs) and not val:
        raise UserError("validation_split holds out no image in any dataset: raise it or add images")
    return DatasetGroup(train), (DatasetGroup(val) if val else None)


def _selector(config):
    if config.enable_bucket:
        lo, hi = adjust_min_max_bucket_reso(config.resolution, config.min_bucket_reso, config.max_bucket_reso,
                                            config.bucket_reso_steps, config.where)
        return BucketSelector(config.resolution, enable_bucket=True, no_upscale=config.bucket_no_upscale,
                              min_size=lo, max_size=hi, steps=config.bucket_reso_steps)
    return BucketSelector(config.resolution, enable_bucket=False)


def _build_dataset(config, split, split_seed):
    selector = _selector(config)
    skipped = []

    def sized(paths):
        out = []
        for p in paths:
            try:
                out.append((p, images.image_size(p)))
            except UserError:
                if not config.skip_corrupt_images:
                    raise
                skipped.append(p)
        return out

    train_entries, reg_entries = [], []   # (path, caption, subset, (w, h))
    subset_images = []
    mask_paths = {}
    for subset in config.subsets:
        if config.is_dreambooth:
            entries = _dreambooth_entries(subset, sized)
            if subset.conditioning_data_dir is not None:
                mask_paths.update(_mask_files(subset, entries))
            if config.validation_split > 0 and not subset.is_reg:
                entries = _split(entries, split, config.validation_split, split_seed)
            elif split == "validation":
                entries = []   # regularisation images never go to validation
            tag_texts = [caption for _, caption, _, _ in entries]
        else:
            tag_texts = []
            entries = _finetune_entries(subset, sized, tag_texts)
        subset_images.append((subset, len(entries), tag_texts))
        (reg_entries if subset.is_reg else train_entries).extend(entries)

    repeats = 1 if split == "validation" else None
    num_train = sum((repeats or s.num_repeats) for _, _, s, _ in train_entries)
    num_reg = sum((repeats or s.num_repeats) for _, _, s, _ in reg_entries)
    reg_repeats = balance_reg_repeats(num_train, [(repeats or s.num_repeats) for _, _, s, _ in reg_entries])

    records = []
    for (path, caption, subset, wh), n in [(e, repeats or e[2].num_repeats) for e in train_entries] + \
                                          list(zip(reg_entries, reg_repeats)):
        if n == 0:
            continue
        if not config.enable_bucket:
            images.check_fixed_size(path, wh, config.resolution, subset.random_crop)
        try:
            choice = selector.select(*wh)
        except UserError as e:
            raise UserError(f"{path}: {e}") from None
        records.append(ImageRecord(path, caption, subset, subset.is_reg, n, wh, choice, mask_paths.get(path)))
    if split == "train" and not any(not r.is_reg for r in records):
        raise UserError(f"{config.where}: no training images (only regularisation images, or every image was skipped)")
    unused = sum(1 for n in reg_repeats if n == 0)
    if unused:
        logger.warning("%s: %d regularisation images are not used (kohya's first-N rule keeps only as many as "
                       "the training images need)", config.where, unused)
    return Dataset(config, records, num_train, num_reg, unused, skipped, subset_images)


def balance_reg_repeats(num_train, reg_repeats):
    """kohya's regularisation balancing (DreamBoothDataset.__init__).

    Walk the reg images in order (subsets in config order, files sorted by path), each adding
    its num_repeats, and stop once the total reaches num_train: later reg images get 0 and are
    never used. If all of them together fall short, add 1 to each in turn (round robin) until
    the total reaches num_train. Returns the new repeat count of each reg image.
    """
    out = [0] * len(reg_repeats)
    if not reg_repeats:
        return out
    total = 0
    for i, n in enumerate(reg_repeats):
        if total >= num_train:
            break
        out[i] = n
        total += n
    while total < num_train:
        for i in range(len(out)):
            out[i] += 1
            total += 1
            if total >= num_train:
                break
    return out


def _split(entries, split, fraction, seed):
    """kohya's split_train_val with a seeded shuffle: train = first ceil(n(1-f)), val = last
    round(nf), except that validation never takes a training image. kohya's two counts can add up
    to more than n (n=3, f=0.5: 2 + 2), and then its sets share images."""
    entries = list(entries)
    random.Random(seed).shuffle(entries)
    n_train = math.ceil(len(entries) * (1 - fraction))
    if split == "train":
        return entries[:n_train]
    return entries[max(n_train, len(entries) - round(len(entries) * fraction)):]


def _dreambooth_entries(subset, sized):
    if not os.path.isdir(subset.image_dir):
        raise UserError(f"{subset.where}: image_dir {subset.image_dir} does not exist or is not a directory")
    paths = images.list_images(subset.image_dir)
    if not paths:
        raise UserError(f"{subset.where}: image_dir {subset.image_dir} has no images "
                        f"({', '.join(images.IMAGE_EXTENSIONS)})")
    entries, missing, matched = [], [], 0
    for path, wh in sized(paths):
        caption = read_caption_file(path, subset.caption_extension, subset.caption.enable_wildcard)
        if caption is not None:
            matched += 1
        elif subset.class_tokens is None:
            missing.append(path)
            continue
        else:
            caption = subset.class_tokens
        entries.append((path, caption, subset, wh))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise UserError(f"{subset.where}: {len(missing)} images have no {subset.caption_extension} caption file and "
                        f"the subset has no class_tokens (kohya trains them on an empty caption): {shown}. "
                        f"Add caption files, set class_tokens, or set caption_extension" + _txt_hint(subset, paths))
    hint = _txt_hint(subset, paths)
    if matched == 0 and hint:
        logger.warning("%s: no %s caption file matched any image, so class_tokens %r is every caption%s",
                       subset.where, subset.caption_extension, subset.class_tokens, hint)
    return entries


def _txt_hint(subset, paths):
    """kohya's top silent trap: captions in .txt while caption_extension is kohya's default .caption."""
    if subset.caption_extension == ".txt":
        return ""
    if any(os.path.isfile(os.path.splitext(p)[0] + ".txt") for p in paths):
        return ". There are .txt files beside the images: set caption_extension = \".txt\" to use them"
    return ""


def _check_metadata_entries(metadata, path, where):
    """Each entry a table with a text `caption` or `tags` (kohya fails later with an
    AttributeError on a number, and trains an entry with neither on an empty caption)."""
    for key, entry in metadata.items():
        if not isinstance(entry, dict):
            raise UserError(f"{where}: metadata_file {path}, entry {key!r}: expected an object "
                            f"with \"caption\" and/or \"tags\", got {entry!r}")
        for field in ("caption", "tags"):
            value = entry.get(field)
            if value is not None and not isinstance(value, str):
                raise UserError(f"{where}: metadata_file {path}, entry {key!r}: \"{field}\" "
                                f"should be text, got {value!r}")
        if not (entry.get("caption") or "").strip() and not (entry.get("tags") or "").strip():
            raise UserError(f"{where}: metadata_file {path}, entry {key!r} has neither a "
                            "caption nor tags; add one or remove the entry")


def _warn_unlisted_images(subset, listed, path):
    """Images in image_dir that the metadata does not name are not trained (as kohya), which a
    user who added images and forgot to re-run the tagger does not expect."""
    unlisted = [os.path.basename(p) for p in images.list_images(subset.image_dir)
                if os.path.abspath(p) not in listed]
    if unlisted:
        logger.warning("%s: %d image(s) in %s have no entry in %s and are not trained: %s%s",
                       subset.where, len(unlisted), subset.image_dir, path, ", ".join(unlisted[:5]),
                       " ..." if len(unlisted) > 5 else "")


def _finetune_entries(subset, sized, tag_texts=None):
    path = subset.metadata_file
    if not os.path.isfile(path):
        raise UserError(f"{subset.where}: metadata_file {path} not found")
    text = read_utf8(path, f"{subset.where}: metadata_file")
    try:
        if path.lower().endswith(".jsonl"):
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            metadata = {r["image_path"]: r for r in rows}
        else:
            metadata = json.loads(text)
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{subset.where}: metadata_file {path} is not valid kohya metadata: {e}") from None
    if not isinstance(metadata, dict) or not metadata:
        raise UserError(f"{subset.where}: metadata_file {path} has no image entries")
    _check_metadata_entries(metadata, path, subset.where)
    if subset.image_dir is not None and not os.path.isdir(subset.image_dir):
        raise UserError(f"{subset.where}: image_dir {subset.image_dir} does not exist or is not a directory")
    resolved, missing = [], []
    for key in sorted(metadata):
        if os.path.isabs(key):
            image_path = key
        elif subset.image_dir is None:
            raise UserError(f"{subset.where}: metadata key {key!r} is a relative path, so the subset needs image_dir")
        else:
            image_path = os.path.join(subset.image_dir, key)
        if not os.path.isfile(image_path):
            missing.append(f"{key!r} -> {image_path}")
        resolved.append((key, image_path))
    if missing:
        shown = "; ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise UserError(f"{subset.where}: {len(missing)} entries of {path} have no image file: {shown}. Metadata "
                        f"keys must be image paths with their extension (kohya's merge scripts write bare stems "
                        f"unless --full_path)")
    if subset.image_dir is not None:
        _warn_unlisted_images(subset, {os.path.abspath(p) for _, p in resolved}, path)
    sizes = dict(sized([p for _, p in resolved]))
    sep = subset.caption.caption_separator
    if tag_texts is not None:
        tag_texts.extend(metadata_tags(metadata[k], sep, subset.caption.enable_wildcard) for k in sorted(metadata))
        tag_texts[:] = [t for t in tag_texts if t is not None]
    return [(p, metadata_caption(metadata[k], sep, subset.caption.enable_wildcard), subset, sizes[p])
            for k, p in resolved if p in sizes]
