"""Aspect-ratio buckets and SDXL size conditioning, with kohya's exact arithmetic.

Every formula here reproduces kohya-ss/sd-scripts (model_util.make_bucket_resolutions,
train_util.BucketManager.select_bucket / get_crop_ltrb, the size conditioning in
BaseDataset.__getitem__); tests/test_data_buckets.py checks them against values produced by
running kohya's own code. Sizes are (width, height) unless a name ends in `_hw`.
"""

import math
from dataclasses import dataclass

from library.errors import UserError


def make_bucket_resolutions(max_reso, min_size=256, max_size=1024, divisible=64):
    """Kohya's predefined bucket list for `max_reso` = (W, H): every (w, h) with w, h multiples of
    `divisible` in [min_size, max_size] whose area is at most W*H, plus the square bucket; sorted."""
    max_area = max_reso[0] * max_reso[1]
    square = int(math.sqrt(max_area) // divisible) * divisible
    resos = {(square, square)}
    for width in range(min_size, max_size + 1, divisible):
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
    return sorted(resos)


def adjust_min_max_bucket_reso(resolution, min_bucket_reso, max_bucket_reso, steps, where):
    """Round min down and max up to multiples of `steps` (kohya warns and does the same), then
    check that the resolution fits between them. Returns (min, max)."""
    min_bucket_reso -= min_bucket_reso % steps
    if max_bucket_reso % steps:
        max_bucket_reso += steps - max_bucket_reso % steps
    if min(resolution) < min_bucket_reso:
        raise UserError(f"{where}: min_bucket_reso ({min_bucket_reso}) is larger than the smaller side of "
                        f"resolution {tuple(resolution)}; lower min_bucket_reso")
    if max(resolution) > max_bucket_reso:
        raise UserError(f"{where}: max_bucket_reso ({max_bucket_reso}) is smaller than the larger side of "
                        f"resolution {tuple(resolution)}; raise max_bucket_reso (SDXL users usually set 2048)")
    return min_bucket_reso, max_bucket_reso


@dataclass(frozen=True)
class BucketChoice:
    bucket_wh: tuple      # the batch shape this image is cropped to
    resized_wh: tuple     # the size the whole image is resized to before the crop
    ar_error: float       # bucket aspect ratio minus image aspect ratio (kohya logs its mean)


class BucketSelector:
    """Chooses each image's bucket like kohya's BucketManager.

    mode "predefined" (enable_bucket, no bucket_no_upscale): nearest aspect ratio among
    make_bucket_resolutions(), resized to cover it. mode "no_upscale": a bucket derived from the
    image itself, shrunk only when its area exceeds the resolution's. mode "fixed" (enable_bucket
    off): one bucket, the resolution itself.
    """

    def __init__(self, resolution, *, enable_bucket, no_upscale=False, min_size=256, max_size=1024, steps=64):
        self.resolution = tuple(resolution)
        self.max_area = resolution[0] * resolution[1]
        self.steps = steps
        if not enable_bucket:
            self.mode = "fixed"
            self.predefined = [self.resolution]
        elif no_upscale:
            self.mode = "no_upscale"
            self.predefined = []
        else:
            self.mode = "predefined"
            self.predefined = make_bucket_resolutions(self.resolution, min_size, max_size, steps)
        self._predefined_set = set(self.predefined)
        self._aspects = [w / h for w, h in self.predefined]

    def _round_to_steps(self, x):
        x = int(x + 0.5)
        return x - x % self.steps

    def select(self, width, height):
        """The BucketChoice for an image of `width` x `height` pixels."""
        aspect = width / height
        if self.mode == "no_upscale":
            if width * height > self.max_area:
                # shrink to the resolution's area keeping the aspect, then round the side whose
                # rounding distorts the aspect ratio less
                rw = math.sqrt(self.max_area * aspect)
                rh = self.max_area / rw
                bw = self._round_to_steps(rw)
                ar_w = bw / self._round_to_steps(bw / aspect)
                bh = self._round_to_steps(rh)
                ar_h = self._round_to_steps(bh * aspect) / bh
                if abs(ar_w - aspect) < abs(ar_h - aspect):
                    resized = (bw, int(bw / aspect + 0.5))
                else:
                    resized = (int(bh * aspect + 0.5), bh)
            else:
                resized = (width, height)
            bucket = (resized[0] - resized[0] % self.steps, resized[1] - resized[1] % self.steps)
            if bucket[0] == 0 or bucket[1] == 0:
                # kohya divides by zero here; say which image and why instead
                raise UserError(f"a {width}x{height} image is smaller than bucket_reso_steps ({self.steps}) "
                                f"on one side after resizing, so it fits no bucket")
        else:
            bucket = (width, height)
            if bucket not in self._predefined_set:
                # first minimum, like numpy's argmin over the sorted list
                errors = [abs(a - aspect) for a in self._aspects]
                bucket = self.predefined[errors.index(min(errors))]
            # cover the bucket: match the side that would otherwise fall short
            scale = bucket[1] / height if aspect > bucket[0] / bucket[1] else bucket[0] / width
            resized = (int(width * scale + 0.5), int(height * scale + 0.5))
        return BucketChoice(tuple(bucket), resized, bucket[0] / bucket[1] - aspect)


def kohya_crop_ltrb(bucket_wh, original_wh):
    """Kohya's get_crop_ltrb: the offsets of the image *fitted inside* the bucket (floats).

    The pixels are really cropped to *cover* the bucket, so this reports the opposite axis to the
    one trimmed (upstream issue #1443). It is what kohya feeds SDXL as crop_top_left, so LoRAs
    trained here see the same conditioning as kohya-trained ones.
    """
    bw, bh = bucket_wh
    image_ar = original_wh[0] / original_wh[1]
    if bw / bh > image_ar:
        rw, rh = bh * image_ar, bh
    else:
        rw, rh = bw, bw / image_ar
    left = (bw - rw) // 2
    top = (bh - rh) // 2
    return left, top, left + rw, top + rh


def size_conditioning(original_wh, bucket_wh, resized_wh, crop_offset_xy, flipped, true_crop=False):
    """SDXL's three size pairs for one sample, as kohya's __getitem__ builds them.

    original_wh: the image size before resizing. crop_offset_xy: the (left, top) pixels really
    trimmed from the resized image (only used with true_crop). Returns (original_size_hw,
    crop_top_left, target_size_hw), ints, in SDXL's (height, width) / (top, left) order.

    Default (true_crop False): kohya's formula, including its inverted axis; a flip mirrors the
    fitted box (left = W - right) and int() truncates. true_crop: the offset of the bucket
    window in the resized image, mirrored when flipped, i.e. what SDXL's own pipeline records.
    """
    bw, bh = bucket_wh
    if true_crop:
        left, top = crop_offset_xy
        if flipped:
            left = resized_wh[0] - bw - left
    else:
        c_left, c_top, c_right, _ = kohya_crop_ltrb(bucket_wh, original_wh)
        left = bw - c_right if flipped else c_left
        top = c_top
    return (int(original_wh[1]), int(original_wh[0])), (int(top), int(left)), (int(bh), int(bw))
