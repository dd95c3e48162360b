"""Buckets, resize/crop and SDXL size conditioning against values from kohya's own code
(tests/fixtures/kohya_golden/buckets.json and getitem.json; see their `_source`)."""

import base64
import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from library.data import images
from library.data.buckets import (BucketSelector, adjust_min_max_bucket_reso, kohya_crop_ltrb,
                                  make_bucket_resolutions, size_conditioning)
from library.data.config_schema import DatasetConfig, SubsetConfig
from library.data.dataset import build_dataset_groups
from library.data.examples import conditioning, load_sample
from library.errors import UserError

GOLDEN = Path(__file__).parent / "fixtures" / "kohya_golden"
BUCKETS = json.loads((GOLDEN / "buckets.json").read_text())
GETITEM = json.loads((GOLDEN / "getitem.json").read_text())


def pattern(w, h):
    """The same deterministic image the golden driver saved (see getitem.json `_source`)."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([(x * 3 + y * 5) % 256, (x * y) % 256, ((x ^ y) * 2) % 256], -1).astype(np.uint8)


@pytest.mark.parametrize("case", BUCKETS["bucket_lists"], ids=lambda c: f"{c['resolution']}-{c['max_bucket_reso']}-{c['bucket_reso_steps']}")
def test_bucket_lists_match_kohya(case):
    got = make_bucket_resolutions(case["resolution"], case["min_bucket_reso"], case["max_bucket_reso"], case["bucket_reso_steps"])
    assert [list(b) for b in got] == case["buckets"]


def test_known_bucket_counts():
    assert len(make_bucket_resolutions((1024, 1024), 256, 1024, 64)) == 25
    assert len(make_bucket_resolutions((1024, 1024), 256, 2048, 64)) == 41


@pytest.mark.parametrize("case", BUCKETS["select_bucket"],
                         ids=lambda c: f"{c['resolution']}-noup{c['bucket_no_upscale']}-{c['max_bucket_reso']}")
def test_select_bucket_and_crop_ltrb_match_kohya(case):
    sel = BucketSelector(case["resolution"], enable_bucket=True, no_upscale=case["bucket_no_upscale"],
                         min_size=case["min_bucket_reso"], max_size=case["max_bucket_reso"], steps=case["bucket_reso_steps"])
    for row in case["rows"]:
        if "error" in row:  # kohya divides by zero; we say which image
            with pytest.raises(UserError, match="fits no bucket"):
                sel.select(*row["image_wh"])
            continue
        choice = sel.select(*row["image_wh"])
        assert list(choice.bucket_wh) == row["bucket_wh"], row
        assert list(choice.resized_wh) == row["resized_wh"], row
        assert choice.ar_error == pytest.approx(row["ar_error"], abs=1e-12)
        assert list(kohya_crop_ltrb(choice.bucket_wh, row["image_wh"])) == pytest.approx(row["crop_ltrb"], abs=1e-9)


def test_min_max_bucket_reso_rounding_matches_kohya():
    for row in BUCKETS["adjust_min_max"]:
        mn, mx, st = row["in"]
        assert list(adjust_min_max_bucket_reso((1024, 1024), mn, mx, st, "x")) == row["out"]
    with pytest.raises(UserError, match="max_bucket_reso"):
        adjust_min_max_bucket_reso((1024, 1024), 256, 512, 64, "datasets[0]")


def _golden_dataset(tmp_path, no_upscale, flip):
    d = tmp_path / "img"
    d.mkdir(exist_ok=True)
    for i, (w, h) in enumerate(GETITEM["image_sizes"]):
        Image.fromarray(pattern(w, h)).save(d / f"im{i}_{w}x{h}.png")
    subset = SubsetConfig(image_dir=str(d), class_tokens="tok", flip_aug=flip, where="s")
    cfg = DatasetConfig(subsets=(subset,), is_dreambooth=True, resolution=tuple(GETITEM["resolution"]),
                        enable_bucket=True, min_bucket_reso=GETITEM["min_bucket_reso"],
                        max_bucket_reso=GETITEM["max_bucket_reso"], bucket_reso_steps=GETITEM["bucket_reso_steps"],
                        bucket_no_upscale=no_upscale, where="d")
    group, _ = build_dataset_groups([cfg], bucket_reso_multiple=8)
    return group.datasets[0]


@pytest.mark.parametrize("case", GETITEM["cases"], ids=lambda c: f"noup{c['bucket_no_upscale']}-flip{c['flip_aug']}")
def test_sample_conditioning_and_pixels_match_kohya_getitem(tmp_path, case):
    ds = _golden_dataset(tmp_path, case["bucket_no_upscale"], case["flip_aug"])
    by_name = {Path(r.path).name: r for r in ds.records}
    for row in case["rows"]:
        rec = by_name[row["file"]]
        assert list(rec.bucket.bucket_wh) == row["bucket_wh"]
        assert list(rec.bucket.resized_wh) == row["resized_wh"]
        got = conditioning(rec, ds.config, flipped=row["flipped"])
        assert [list(v) for v in got] == [row["original_size_hw"], row["crop_top_left"], row["target_size_hw"]], row
        if row["pixels_hwc_u8_b64"] is None:
            continue
        sample = load_sample(rec, ds.config, random.Random(0))
        assert not sample["flipped"]
        assert [list(v) for v in (sample["original_size_hw"], sample["crop_top_left"], sample["target_size_hw"])] == \
            [row["original_size_hw"], row["crop_top_left"], row["target_size_hw"]]
        ours = sample["image"].astype(np.int16)
        bw, bh = row["bucket_wh"]
        theirs = np.frombuffer(base64.b64decode(row["pixels_hwc_u8_b64"]), np.uint8).reshape(bh, bw, 3).astype(np.int16)
        diff = np.abs(ours - theirs)
        w, h = rec.original_wh
        if (w, h) == tuple(rec.bucket.resized_wh) or w < rec.bucket.resized_wh[0] or h < rec.bucket.resized_wh[1]:
            assert diff.max() == 0, row["file"]           # crop only, or PIL Lanczos: exactly kohya's pixels
        else:
            # area averaging: kohya uses cv2.INTER_AREA (float32); ours rounds a float64 mean
            assert diff.max() <= 1 and diff.mean() < 0.05, (row["file"], diff.max(), diff.mean())


def test_kohya_inverted_axis_and_true_crop():
    # 800x1200 into 832x1216: resized to 832x1248, 16 px trimmed top and bottom
    orig_hw, crop, target = size_conditioning((800, 1200), (832, 1216), (832, 1248), (0, 16), flipped=False)
    assert (orig_hw, crop, target) == ((1200, 800), (0, 10), (1216, 832))      # kohya: left=10, top=0 (#1443)
    assert size_conditioning((800, 1200), (832, 1216), (832, 1248), (0, 16), False, true_crop=True)[1] == (16, 0)
    # flipped: the true crop mirrors the window inside the resized image
    assert size_conditioning((1920, 1080), (1344, 768), (1365, 768), (10, 0), True, true_crop=True)[1] == (0, 11)


def test_true_crop_reflects_random_crop(tmp_path):
    d = tmp_path / "img"
    d.mkdir()
    Image.fromarray(pattern(200, 100)).save(d / "a.png")
    subset = SubsetConfig(image_dir=str(d), class_tokens="t", random_crop=True, where="s")
    cfg = DatasetConfig(subsets=(subset,), is_dreambooth=True, resolution=(64, 64), enable_bucket=True,
                        min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32, true_crop_top_left=True, where="d")
    ds = build_dataset_groups([cfg])[0].datasets[0]
    rec = ds.records[0]
    lefts = {load_sample(rec, cfg, random.Random(s))["crop_top_left"][1] for s in range(8)}
    excess = rec.bucket.resized_wh[0] - rec.bucket.bucket_wh[0]
    assert len(lefts) > 1 and all(0 <= v <= excess for v in lefts)


def test_area_resize_is_box_mean_on_integer_factor():
    img = pattern(40, 20)
    out = images.resize(img, (20, 10))
    expect = img.reshape(10, 2, 20, 2, 3).astype(np.float64).mean(axis=(1, 3))
    assert np.abs(out - np.floor(expect + 0.5)).max() == 0
