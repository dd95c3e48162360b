"""The dataset-dependent `ss_*` metadata keys kohya writes into a LoRA (train_network.py,
the metadata block of NetworkTrainer.train), as strings in kohya's exact formats.

    md = dataset_metadata(train_group, val_group, args)     # merge into the other ss_* keys

With --dataset_config: ss_datasets, ss_tag_frequency, ss_dataset_dirs. With the legacy
--train_data_dir form: ss_batch_size_per_device, ss_total_batch_size, ss_resolution, the
augmentation flags, the bucket settings, ss_dataset_dirs, ss_reg_dataset_dirs,
ss_tag_frequency, ss_bucket_info. Always: ss_num_train_images, ss_num_validation_images,
ss_num_reg_images, ss_num_batches_per_epoch. tests/test_data_metadata.py compares the output
with kohya's on the same files.
"""

import json
import os

from library.data.buckets import adjust_min_max_bucket_reso


def tag_frequency(texts):
    """kohya's set_tag_frequency: tags split on "," (whatever caption_separator is), stripped,
    lower-cased, empty ones skipped; {tag: count} in first-seen order."""
    freq = {}
    for text in texts:
        for tag in text.split(","):
            tag = tag.strip().lower()
            if tag:
                freq[tag] = freq.get(tag, 0) + 1
    return freq


def _dataset_tag_frequency(ds):
    freq = {}
    for subset, _, texts in ds.subset_images:
        name = os.path.basename(subset.image_dir if ds.config.is_dreambooth else subset.metadata_file)
        into = freq.setdefault(name, {})
        for tag, n in tag_frequency(texts).items():
            into[tag] = into.get(tag, 0) + n
    return freq


def bucket_info(ds):
    """kohya's bucket_info: the buckets in sorted order with their sample counts (repeats
    included) and the mean aspect-ratio error of the images; None without bucketing."""
    if not ds.config.enable_bucket:
        return None
    buckets = {i: {"resolution": list(wh), "count": len(ds.buckets[wh])} for i, wh in enumerate(sorted(ds.buckets))}
    return {"buckets": buckets, "mean_img_ar_error": ds.mean_ar_error()}


def _bucket_range(config):
    if not config.enable_bucket:
        return None, None
    return adjust_min_max_bucket_reso(config.resolution, config.min_bucket_reso, config.max_bucket_reso,
                                      config.bucket_reso_steps, config.where)


def _subset_metadata(subset, img_count, is_dreambooth):
    c = subset.caption
    md = {"img_count": img_count, "num_repeats": subset.num_repeats, "color_aug": bool(subset.color_aug),
          "flip_aug": bool(subset.flip_aug), "random_crop": bool(subset.random_crop),
          "shuffle_caption": bool(c.shuffle_caption), "keep_tokens": c.keep_tokens,
          "keep_tokens_separator": c.keep_tokens_separator, "secondary_separator": c.secondary_separator,
          "enable_wildcard": bool(c.enable_wildcard), "caption_prefix": c.caption_prefix,
          "caption_suffix": c.caption_suffix, "resize_interpolation": subset.resize_interpolation}
    if subset.image_dir:
        md["image_dir"] = os.path.basename(subset.image_dir)
    if is_dreambooth:
        md["class_tokens"] = subset.class_tokens
        md["is_reg"] = subset.is_reg
    else:
        md["metadata_file"] = os.path.basename(subset.metadata_file)
    return md


def dataset_metadata(train, val=None, args=None, total_batch_size=None, num_batches_per_epoch=None):
    """The dataset-dependent ss_* keys (all values strings) for `train` (and `val`) groups.

    args: the parsed command line; `args.dataset_config` decides between kohya's two layouts, and
    the legacy layout reads train_batch_size, color_aug, flip_aug, random_crop, shuffle_caption
    and keep_tokens from it. total_batch_size: batch x processes x gradient accumulation (legacy
    layout; default: the batch size). num_batches_per_epoch: kohya's len(train_dataloader) as the
    trainer sees it (default: the group's batch count).
    """
    md = {
        "ss_num_train_images": sum(ds.num_train_images for ds in train.datasets),
        "ss_num_validation_images": sum(ds.num_train_images for ds in val.datasets) if val is not None else 0,
        "ss_num_reg_images": sum(ds.num_reg_images for ds in train.datasets),
        "ss_num_batches_per_epoch": num_batches_per_epoch if num_batches_per_epoch is not None else train.num_batches(),
    }
    if args is None or getattr(args, "dataset_config", None) is not None:
        datasets, tags, dirs = [], {}, {}
        for ds in train.datasets:
            cfg = ds.config
            lo, hi = _bucket_range(cfg)
            freq = _dataset_tag_frequency(ds)
            subsets = []
            for subset, img_count, _ in ds.subset_images:
                subsets.append(_subset_metadata(subset, img_count, cfg.is_dreambooth))
                name = None
                if subset.image_dir:
                    name = os.path.basename(subset.image_dir)
                if cfg.is_dreambooth:
                    if subset.is_reg:
                        name = None
                else:
                    name = os.path.basename(subset.metadata_file)
                if name is not None:
                    unique, i = name, 2
                    while unique in dirs:
                        unique, i = f"{name} ({i})", i + 1
                    dirs[unique] = {"n_repeats": subset.num_repeats, "img_count": img_count}
            datasets.append({
                "is_dreambooth": cfg.is_dreambooth, "batch_size_per_device": cfg.batch_size,
                "num_train_images": ds.num_train_images, "num_reg_images": ds.num_reg_images,
                "resolution": list(cfg.resolution), "enable_bucket": bool(cfg.enable_bucket),
                "min_bucket_reso": lo, "max_bucket_reso": hi, "tag_frequency": freq, "bucket_info": bucket_info(ds),
                "resize_interpolation": cfg.resize_interpolation, "subsets": subsets})
            for name, f in freq.items():
                tags.setdefault(name, f)     # a folder used by several datasets counts once
        md["ss_datasets"] = json.dumps(datasets)
        md["ss_tag_frequency"] = json.dumps(tags)
        md["ss_dataset_dirs"] = json.dumps(dirs)
    else:
        ds = train.datasets[0]
        cfg = ds.config
        lo, hi = _bucket_range(cfg)
        dirs, regs = {}, {}
        for subset, img_count, _ in ds.subset_images:
            if cfg.is_dreambooth:
                into, name = (regs if subset.is_reg else dirs), os.path.basename(subset.image_dir)
            else:
                into, name = dirs, os.path.basename(subset.metadata_file)
            into[name] = {"n_repeats": subset.num_repeats, "img_count": img_count}
        md.update({
            "ss_batch_size_per_device": args.train_batch_size,
            "ss_total_batch_size": total_batch_size if total_batch_size is not None else args.train_batch_size,
            "ss_resolution": tuple(cfg.resolution),
            "ss_color_aug": bool(args.color_aug), "ss_flip_aug": bool(args.flip_aug),
            "ss_random_crop": bool(args.random_crop), "ss_shuffle_caption": bool(args.shuffle_caption),
            "ss_enable_bucket": bool(cfg.enable_bucket),
            "ss_bucket_no_upscale": bool(cfg.enable_bucket and cfg.bucket_no_upscale),
            "ss_min_bucket_reso": lo, "ss_max_bucket_reso": hi, "ss_keep_tokens": args.keep_tokens,
            "ss_dataset_dirs": json.dumps(dirs), "ss_reg_dataset_dirs": json.dumps(regs),
            "ss_tag_frequency": json.dumps(_dataset_tag_frequency(ds)), "ss_bucket_info": json.dumps(bucket_info(ds)),
        })
    return {k: str(v) for k, v in md.items()}
