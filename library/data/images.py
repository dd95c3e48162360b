"""Image files: finding them, reading their size, decoding, resizing into a bucket, augmenting.

Plain PIL and numpy. Arrays are uint8 HWC (RGB, or RGBA when an alpha mask is wanted) until
`to_chw_float` turns one into the model's CHW float32 in [-1, 1].
"""

import logging
import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from library.errors import UserError
from library.lora_metadata import calculate_sha256

# kohya's list (train_util.IMAGE_EXTENSIONS), compared case-insensitively; kohya matches only the
# all-lower and all-upper spellings, so `a.Png` is picked up here and skipped there
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# EXIF orientations 5-8 rotate by 90 degrees, so width and height trade places
_EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}

RESIZE_INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")
_PIL_FILTERS = {
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "linear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "cubic": Image.Resampling.BICUBIC,
}


def is_image_file(name):
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_images(directory):
    """The image files directly inside `directory` (not recursive, like kohya), sorted by path.
    A symlink to a missing file is left out with a warning (kohya skips it silently)."""
    names = [n for n in os.listdir(directory) if is_image_file(n)]
    dangling = sorted(n for n in names if os.path.islink(os.path.join(directory, n))
                      and not os.path.exists(os.path.join(directory, n)))
    if dangling:
        logging.getLogger(__name__).warning(
            "%s: %d image link(s) point to a missing file and are left out: %s%s", directory,
            len(dangling), ", ".join(dangling[:5]), " ..." if len(dangling) > 5 else "")
    return sorted(os.path.join(directory, n) for n in names
                  if os.path.isfile(os.path.join(directory, n)))


def image_size(path):
    """(width, height) as displayed, i.e. after the EXIF orientation, from the header only."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            if im.getexif().get(_EXIF_ORIENTATION) in _TRANSPOSED_ORIENTATIONS:
                w, h = h, w
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"cannot read image {path}: {e}. Remove or replace the file, or pass "
                        f"--skip_corrupt_images to leave such files out") from None
    if w <= 0 or h <= 0:
        raise UserError(f"image {path} has an empty size {w}x{h}")
    return w, h


def _as_8_bit(im):
    """16-bit grayscale (PNG mode I;16) scaled to 8 bits: PIL's own conversion clips every value
    above 255, so such an image would train as a white square (kohya has this bug)."""
    if im.mode not in ("I;16", "I;16L", "I;16B", "I;16N"):
        return im
    wide = np.asarray(im, dtype=np.uint32)
    return Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8))     # mode L


def load_image(path, alpha=False):
    """Decode to uint8 HWC: RGB, or RGBA when `alpha` (an image without alpha gets A=255).

    Like kohya, RGB conversion of an RGBA image drops the alpha channel rather than compositing
    on a background. Unlike kohya, the EXIF orientation is applied.
    """
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            im = _as_8_bit(im)
            mode = "RGBA" if alpha else "RGB"
            if im.mode != mode:
                im = im.convert(mode)
            return np.asarray(im, dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"cannot decode image {path}: {e}. Remove or replace the file") from None


def file_digest(path):
    """SHA-256 of the file's bytes: the content key the latent cache uses, so an edited image is
    never served a stale latent (the same full-file hash as a model's ss_new_sd_model_hash)."""
    return calculate_sha256(path)


def _area_weights(n_in, n_out):
    """Sparse (index, weight) lists for an exact area average of `n_in` samples onto `n_out`."""
    scale = n_in / n_out
    starts = np.arange(n_out) * scale
    ends = starts + scale
    first = np.floor(starts).astype(np.int64)
    last = np.minimum(np.ceil(ends).astype(np.int64), n_in)
    taps = int((last - first).max())
    idx = first[:, None] + np.arange(taps)[None, :]
    lo = np.maximum(idx, starts[:, None])
    hi = np.minimum(idx + 1, ends[:, None])
    w = np.clip(hi - lo, 0, None) / scale
    return np.minimum(idx, n_in - 1), w


def _resize_area(img, size):
    """cv2.INTER_AREA for shrinking: each output pixel is the mean of the input area it covers.

    Separable, one weighted gather per tap (2-3 taps for the usual shrink factors), in float32 as
    OpenCV; rounding can still differ from OpenCV by one level on a few pixels. (PIL's BOX filter
    is not the same: it gives a partly covered input pixel all or nothing of its weight.)
    """
    out = img  # the first gather reads uint8, a quarter of the memory traffic of float32
    for n_out in (size[1], size[0]):
        # gather along the first axis (contiguous rows), then transpose for the other pass
        idx, w = _area_weights(out.shape[0], n_out)
        w = w.astype(np.float32).reshape((n_out, -1) + (1,) * (out.ndim - 1))
        acc = out[idx[:, 0]] * w[:, 0]
        for t in range(1, idx.shape[1]):
            acc += out[idx[:, t]] * w[:, t]
        out = np.ascontiguousarray(acc.swapaxes(0, 1))
    return np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)


def resize(img, size, interpolation=None):
    """Resize a uint8 HWC array to `size` = (w, h) with kohya's filter choice.

    None: area averaging when shrinking on both axes, else PIL Lanczos (kohya: cv2 INTER_AREA /
    PIL LANCZOS). Named filters use PIL; kohya uses OpenCV for nearest, bilinear, bicubic and
    area, which differ from PIL's antialiased versions when shrinking (see docs/dataset.md).
    """
    h, w = img.shape[:2]
    if interpolation is None:
        interpolation = "area" if w >= size[0] and h >= size[1] else "lanczos"
    if interpolation == "area" and w >= size[0] and h >= size[1]:
        return _resize_area(img, size)
    if interpolation == "area":  # enlarging with area averaging is box sampling
        interpolation = "box"
    return np.asarray(Image.fromarray(img).resize(size, resample=_PIL_FILTERS[interpolation]))


def centre_crop_xy(image_wh, crop_wh):
    """The (left, top) of a centred crop, rounded down as kohya rounds it."""
    return (image_wh[0] - crop_wh[0]) // 2, (image_wh[1] - crop_wh[1]) // 2


def trim_and_resize(img, bucket_wh, resized_wh, rng, random_crop=False, interpolation=None):
    """Resize the image to `resized_wh` and crop it to `bucket_wh` (kohya's
    trim_and_resize_if_required). The crop is centred, or at a random offset drawn from `rng`
    (width first, then height, as kohya draws them). Returns (array, (left, top) of the crop)."""
    h, w = img.shape[:2]
    if (w, h) != tuple(resized_wh):
        img = resize(img, tuple(resized_wh), interpolation)
    h, w = img.shape[:2]
    centre_left, centre_top = centre_crop_xy((w, h), bucket_wh)
    left = top = 0
    if w > bucket_wh[0]:
        left = rng.randint(0, w - bucket_wh[0]) if random_crop else centre_left
        img = img[:, left:left + bucket_wh[0]]
    if h > bucket_wh[1]:
        top = rng.randint(0, h - bucket_wh[1]) if random_crop else centre_top
        img = img[top:top + bucket_wh[1]]
    return img, (left, top)


def _rgb_to_hsv(rgb):
    mx, mn = rgb.max(-1), rgb.min(-1)
    diff = mx - mn
    safe = np.where(diff == 0, 1, diff)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    h = np.where(mx == r, (g - b) / safe % 6, np.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4))
    h = np.where(diff == 0, 0, h) * 60.0
    s = np.where(mx == 0, 0, diff / np.where(mx == 0, 1, mx))
    return h, s, mx


def _hsv_to_rgb(h, s, v):
    c = v * s
    hp = (h % 360) / 60.0
    x = c * (1 - np.abs(hp % 2 - 1))
    z = np.zeros_like(c)
    sector = np.floor(hp).astype(np.int64) % 6
    table = [(c, x, z), (x, c, z), (z, c, x), (z, x, c), (x, z, c), (c, z, x)]
    rgb = np.zeros(h.shape + (3,))
    for i, (r, g, b) in enumerate(table):
        m = sector == i
        rgb[m] = np.stack([r[m], g[m], b[m]], -1)
    return rgb + (v - c)[..., None]


def color_aug(rgb, rng):
    """Kohya's AugHelper.color_aug on a uint8 HWC RGB array, with the same random draws:
    with p=0.33, either a hue shift of U(-8, 8) OpenCV hue units (2 degrees each) or a gamma
    in U(0.95, 1.05). Kohya runs the hue shift through cv2's BGR2HSV on RGB data, which turns
    a shift of +s into -s; the distribution is symmetric, so here the shift is applied as -s in
    true RGB. The gamma branch is exact; the hue branch rounds differently from OpenCV's uint8
    HSV (within a couple of levels)."""
    if rng.random() > 0.33:
        return rgb
    if rng.random() > 0.5:
        shift = rng.uniform(-8, 8)
        h, s, v = _rgb_to_hsv(rgb.astype(np.float64))
        out = _hsv_to_rgb(h - 2.0 * shift, s, v)
        return np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)
    gamma = rng.uniform(0.95, 1.05)
    return np.clip(rgb.astype(np.float64) ** gamma, 0, 255).astype(np.uint8)


def to_chw_float(img):
    """uint8 HWC RGB -> float32 CHW in [-1, 1] (kohya's ToTensor + Normalize(0.5, 0.5))."""
    return np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32) / 127.5 - 1.0


def check_fixed_size(path, original_wh, resolution, random_crop):
    """Bucketing off: kohya uses the image as is, so it must be exactly the resolution, or larger
    with random_crop (which crops it)."""
    w, h = original_wh
    rw, rh = resolution
    if (w, h) == (rw, rh) or (random_crop and w >= rw and h >= rh):
        return
    need = "at least" if random_crop else "exactly"
    raise UserError(f"image {path} is {w}x{h} but enable_bucket is off, so it must be {need} {rw}x{rh}; "
                    f"set enable_bucket = true (recommended for SDXL) or resize the image")


def crop_fixed(img, resolution, rng):
    """Bucketing off with random_crop: a random resolution-sized window, height drawn first as
    kohya draws it. Returns (array, (left, top))."""
    h, w = img.shape[:2]
    top = rng.randint(0, h - resolution[1]) if h > resolution[1] else 0
    left = rng.randint(0, w - resolution[0]) if w > resolution[0] else 0
    return img[top:top + resolution[1], left:left + resolution[0]], (left, top)
