"""Host-side resampling that matches PyTorch's `F.interpolate` numerically (numpy only).

Three steps resize arrays whose sizes change from step to step or come with the data: in training,
the multi-resolution noise pyramid (random level sizes, bilinear) and loss masks (pixel size to
latent size, "area"), which on the host keep the compiled step's input shapes fixed; in the
generator, the latent upscale of the highres-fix pass (bilinear, as kohya's torch call).
"""

import math

import numpy as np


def _bilinear_axis(in_size, out_size):
    """Source indices and weights along one axis, as PyTorch's `align_corners=False` computes them."""
    scale = np.float32(in_size / out_size)
    src = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    src = np.maximum(src, np.float32(0.0))  # PyTorch clamps negative source coordinates to 0
    lo = np.floor(src).astype(np.int64)
    lo = np.minimum(lo, in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = (src - lo).astype(np.float32)
    return lo, hi, frac


def bilinear_resize(x, size):
    """`F.interpolate(x, size, mode="bilinear", align_corners=False)` for x of shape (..., H, W)."""
    out_h, out_w = size
    y0, y1, fy = _bilinear_axis(x.shape[-2], out_h)
    x0, x1, fx = _bilinear_axis(x.shape[-1], out_w)
    rows = x[..., y0, :] * (1 - fy)[:, None] + x[..., y1, :] * fy[:, None]
    out = rows[..., x0] * (1 - fx) + rows[..., x1] * fx
    return out.astype(x.dtype, copy=False)


def _area_matrix(in_size, out_size):
    """Averaging matrix of adaptive average pooling: output i covers [floor(i·n/m), ceil((i+1)·n/m))."""
    m = np.zeros((out_size, in_size), dtype=np.float64)
    for i in range(out_size):
        start = (i * in_size) // out_size
        end = math.ceil((i + 1) * in_size / out_size)
        m[i, start:end] = 1.0 / (end - start)
    return m


def area_resize(x, size):
    """`F.interpolate(x, size, mode="area")` (adaptive average pooling) for x of shape (..., H, W)."""
    rows = _area_matrix(x.shape[-2], size[0])
    cols = _area_matrix(x.shape[-1], size[1])
    out = np.einsum("ih,...hw,jw->...ij", rows, x.astype(np.float64), cols)
    return out.astype(x.dtype)
