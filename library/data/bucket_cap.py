"""--max_bucket_count (this port's option): fewer bucket shapes, so fewer step graphs to compile.

Every distinct batch shape costs one compile of the train step (about a minute for the tiny
model on a 2-core CPU, more for SDXL). With a cap of N, the N buckets holding the most samples
(repeats counted) are kept; every image of a dropped bucket moves to the kept bucket nearest to
its own aspect ratio and is resized to cover it and cropped, exactly as bucketing does for an
image whose own bucket does not exist (BucketSelector's predefined mode). The price is more
cropping (the mean aspect-ratio error, kohya's "mean ar error", grows), reported in the log.

Datasets with bucketing off keep their one shape (their images are not resized), so their shapes
count towards the cap and always stay. Validation images move to the same kept buckets, so the
validation step compiles no other shapes.
"""

import dataclasses
from dataclasses import dataclass

import numpy as np

from library.data.buckets import BucketChoice
from library.errors import UserError


@dataclass
class BucketCap:
    """What the cap did, for the log."""
    max_count: int
    buckets_before: list        # [(w, h), ...]
    buckets_after: list
    images_moved: int           # distinct images (train and validation) given another bucket
    samples_moved: int          # the same with repeats, per epoch
    graphs_before: int          # distinct batch shapes (bucket, batch length) = step graphs
    graphs_after: int
    mean_ar_error_before: float
    mean_ar_error_after: float

    def as_dict(self):
        d = dataclasses.asdict(self)
        d["buckets_before"] = [list(b) for b in self.buckets_before]
        d["buckets_after"] = [list(b) for b in self.buckets_after]
        return d

    def estimated_seconds_saved(self, compile_seconds):
        """Compile time not spent: the graphs dropped times the mean measured compile time."""
        if not compile_seconds:
            return None
        return (self.graphs_before - self.graphs_after) * float(np.mean(list(compile_seconds)))


def batch_shape_count(group):
    """Distinct (bucket, batch length) pairs: each is one compiled step graph."""
    shapes = set()
    for ds in group.datasets:
        bs = ds.config.batch_size
        for wh, items in ds.buckets.items():
            if len(items) >= bs:
                shapes.add((wh, bs))
            if len(items) % bs:
                shapes.add((wh, len(items) % bs))
    return len(shapes)


def _mean_ar_error(groups):
    errors = [abs(r.bucket.ar_error) for g in groups for ds in g.datasets for r in ds.records]
    return float(np.mean(errors)) if errors else 0.0


def _moved(record, kept):
    """The record in the kept bucket nearest its aspect ratio, resized to cover it."""
    w, h = record.original_wh
    aspect = w / h
    errors = [abs(bw / bh - aspect) for bw, bh in kept]
    bw, bh = kept[errors.index(min(errors))]    # ties: the first in sorted order, like bucketing
    scale = bh / h if aspect > bw / bh else bw / w
    resized = (int(w * scale + 0.5), int(h * scale + 0.5))
    return dataclasses.replace(record, bucket=BucketChoice((bw, bh), resized, bw / bh - aspect))


def _rebuild(ds, kept):
    from library.data.dataset import Dataset
    moved = [r if r.bucket.bucket_wh in kept else _moved(r, sorted(kept)) for r in ds.records]
    count = sum(1 for a, b in zip(ds.records, moved) if a is not b)
    samples = sum(b.num_repeats for a, b in zip(ds.records, moved) if a is not b)
    new = Dataset(ds.config, moved, ds.num_train_images, ds.num_reg_images, ds.unused_reg_images,
                  ds.skipped_corrupt, ds.subset_images)
    return new, count, samples


def cap_buckets(train_group, max_count, val_group=None):
    """Apply --max_bucket_count in place; returns a BucketCap, or None when already within it."""
    if max_count < 1:
        raise UserError(f"--max_bucket_count {max_count} must be 1 or more")
    before = train_group.bucket_shapes()
    if len(before) <= max_count:
        return None
    fixed = {wh for ds in train_group.datasets if not ds.config.enable_bucket for wh in ds.buckets}
    if len(fixed) > max_count:
        raise UserError(f"--max_bucket_count {max_count}: datasets with enable_bucket off need "
                        f"{len(fixed)} shapes {sorted(fixed)} of their own; raise the cap or "
                        f"enable bucketing")
    samples = {}
    for ds in train_group.datasets:
        for wh, items in ds.buckets.items():
            samples[wh] = samples.get(wh, 0) + len(items)
    movable = sorted((wh for wh in samples if wh not in fixed), key=lambda wh: (-samples[wh], wh))
    kept = fixed | set(movable[:max_count - len(fixed)])
    groups = [g for g in (train_group, val_group) if g is not None]
    graphs_before, ar_before = batch_shape_count(train_group), _mean_ar_error(groups)
    images = moved_samples = 0
    for group in groups:
        for i, ds in enumerate(group.datasets):
            if not ds.config.enable_bucket:
                continue
            group.datasets[i], n, s = _rebuild(ds, kept)
            images, moved_samples = images + n, moved_samples + s
    return BucketCap(max_count, before, train_group.bucket_shapes(), images, moved_samples,
                     graphs_before, batch_shape_count(train_group), ar_before,
                     _mean_ar_error(groups))
