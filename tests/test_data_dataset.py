"""Records, regularisation balancing (against kohya: tests/fixtures/kohya_golden/reg_balance.json),
epoch order, resumable position, worker processes and image decoding details."""

import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from library.data import images
from library.data.captions import CaptionOptions
from library.data.config_schema import DatasetConfig, SubsetConfig
from library.data.dataset import balance_reg_repeats, build_dataset_groups
from library.data.examples import load_sample
from library.data.loader import BatchLoader
from library.errors import UserError

REG = json.loads((Path(__file__).parent / "fixtures" / "kohya_golden" / "reg_balance.json").read_text())["cases"]


def make_images(folder, sizes, ext="png", mode="RGB"):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        arr = rng.integers(0, 256, (h, w, len(mode)), dtype=np.uint8)
        Image.fromarray(arr, mode).save(folder / f"{i:03d}.{ext}")
    return folder


def dataset_config(subsets, **kw):
    kw = {"resolution": (64, 64), "enable_bucket": True, "min_bucket_reso": 32, "max_bucket_reso": 128,
          "bucket_reso_steps": 32, "where": "datasets[0]", **kw}
    return DatasetConfig(subsets=tuple(subsets), is_dreambooth=True, **kw)


def subset(folder, **kw):
    caption = {k: kw.pop(k) for k in list(kw) if k in CaptionOptions.__dataclass_fields__}
    return SubsetConfig(image_dir=str(folder), class_tokens=kw.pop("class_tokens", "tok"), where=str(folder),
                        caption=CaptionOptions(**caption), **kw)


@pytest.mark.parametrize("case", REG, ids=lambda c: c["name"])
def test_reg_balancing_matches_kohya(tmp_path, case):
    subs = []
    for i, s in enumerate(case["subsets"]):
        folder = make_images(tmp_path / f"s{i}", [(64, 64)] * s["images"])
        subs.append(subset(folder, num_repeats=s["num_repeats"], is_reg=s["is_reg"]))
    group, _ = build_dataset_groups([dataset_config(subs, batch_size=case["batch_size"])])
    ds = group.datasets[0]
    assert ds.num_train_images == case["num_train_images"]
    assert ds.num_reg_images == case["num_reg_images"]
    assert ds.num_batches() == case["len_batches"]
    assert group.num_samples() == case["samples_per_epoch"]
    got = [[int(Path(r.subset.image_dir).name[1:]), Path(r.path).name, r.num_repeats] for r in ds.records]
    assert got == case["registered_repeats"]


def test_balance_rule_examples():
    assert balance_reg_repeats(30, [1] * 7) == [5, 5, 4, 4, 4, 4, 4]
    assert balance_reg_repeats(30, [1] * 50) == [1] * 30 + [0] * 20     # first N only, every epoch
    assert balance_reg_repeats(5, [3, 3]) == [3, 3]


def _group(tmp_path, batch_size=2, **subset_kw):
    a = make_images(tmp_path / "a", [(64, 64), (96, 48), (48, 96), (64, 64), (96, 48)])
    return build_dataset_groups([dataset_config([subset(a, num_repeats=3, **subset_kw)], batch_size=batch_size)])[0]


def test_batches_never_mix_buckets_and_cover_every_sample(tmp_path):
    group = _group(tmp_path)
    # 96x48 ties between (64, 64) and (96, 32); kohya takes the first in sorted order
    assert group.bucket_shapes() == [(32, 96), (64, 64)]
    batches = group.epoch_batches(seed=3, epoch=1)
    ds = group.datasets[0]
    for _, idx in batches:
        assert len({ds.records[i].bucket.bucket_wh for i in idx}) == 1
        assert 1 <= len(idx) <= 2
    assert sorted(i for _, idx in batches for i in idx) == sorted(i for v in ds.buckets.values() for i in v)
    assert len(batches) == group.num_batches()


def test_order_is_a_function_of_seed_and_epoch(tmp_path):
    group = _group(tmp_path)
    assert group.epoch_batches(1, 1) == group.epoch_batches(1, 1)
    assert group.epoch_batches(1, 1) != group.epoch_batches(1, 2)
    assert group.epoch_batches(1, 1) != group.epoch_batches(2, 1)


def _captions(batches):
    return [[(s["path"], s["caption"], s["flipped"]) for s in b] for b in batches]


def test_resume_inside_an_epoch_gives_the_same_remaining_batches(tmp_path):
    group = _group(tmp_path, flip_aug=True, shuffle_caption=True, class_tokens="a, b, c, d")
    full = _captions(BatchLoader(group, seed=5).epoch(2))
    loader = BatchLoader(group, seed=5)
    it = loader.epoch(2)
    head = [next(it) for _ in range(3)]
    state = json.loads(json.dumps(loader.state_dict()))
    assert state == {"seed": 5, "epoch": 2, "batch": 3}
    resumed = BatchLoader(group, seed=5)
    resumed.load_state_dict(state)
    assert _captions(head) + _captions(resumed.epoch(2)) == full
    assert resumed.state_dict() == {"seed": 5, "epoch": 3, "batch": 0}
    with pytest.raises(UserError, match="same --seed"):
        BatchLoader(group, seed=6).load_state_dict(state)


def test_two_workers_give_the_same_batches_as_in_process(tmp_path):
    group = _group(tmp_path, flip_aug=True, random_crop=True, color_aug=True, shuffle_caption=True,
                   class_tokens="a, b, c")
    inproc = list(BatchLoader(group, seed=9, num_workers=0).epoch(1))
    workers = list(BatchLoader(group, seed=9, num_workers=2).epoch(1))
    assert _captions(inproc) == _captions(workers)
    for b0, b1 in zip(inproc, workers):
        for s0, s1 in zip(b0, b1):
            assert s1["image"].dtype == np.float32 and s1["image"].shape[0] == 3
            np.testing.assert_array_equal(s0["image"], s1["image"])


def test_sample_fields(tmp_path):
    group = _group(tmp_path, batch_size=1)
    [sample] = next(iter(BatchLoader(group, seed=0).epoch(1)))
    w, h = sample["bucket_wh"]
    assert sample["image"].shape == (3, h, w) and sample["image"].dtype == np.float32
    assert -1.0 <= sample["image"].min() and sample["image"].max() <= 1.0
    assert sample["target_size_hw"] == (h, w) and sample["alpha_mask"] is None
    assert sample["caption"] == "tok" and sample["loss_weight"] == 1.0


def test_alpha_mask_and_rgba_without_mask(tmp_path):
    folder = tmp_path / "rgba"
    folder.mkdir()
    arr = np.zeros((64, 64, 4), np.uint8)
    arr[..., 0] = 200
    arr[:, :32, 3] = 255          # left half opaque
    Image.fromarray(arr, "RGBA").save(folder / "a.png")
    cfg = dataset_config([subset(folder, alpha_mask=True, flip_aug=True)])
    rec = build_dataset_groups([cfg])[0].datasets[0].records[0]
    for seed in range(6):
        s = load_sample(rec, cfg, random.Random(seed))
        left, right = s["alpha_mask"][:, :32].mean(), s["alpha_mask"][:, 32:].mean()
        assert (left, right) == ((0.0, 1.0) if s["flipped"] else (1.0, 0.0))
    plain = dataset_config([subset(folder)])
    s = load_sample(build_dataset_groups([plain])[0].datasets[0].records[0], plain, random.Random(0))
    # like kohya, RGB conversion drops alpha (no compositing): the red channel stays 200 everywhere
    assert s["alpha_mask"] is None and (s["image"][..., 0] == 200).all()


def test_exif_orientation_is_applied(tmp_path):
    folder = tmp_path / "exif"
    folder.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6               # rotate 90 degrees: stored 96x48 shows as 48x96
    Image.fromarray(np.zeros((48, 96, 3), np.uint8)).save(folder / "a.jpg", exif=exif)
    assert images.image_size(str(folder / "a.jpg")) == (48, 96)
    assert images.load_image(str(folder / "a.jpg")).shape == (96, 48, 3)


def test_extensions_any_case_and_not_recursive(tmp_path):
    folder = make_images(tmp_path / "e", [(8, 8)] * 2)
    (folder / "000.png").rename(folder / "x.PnG")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "y.JPEG")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "z.webp")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "w.bmp")
    (folder / "notes.txt").write_text("x")
    make_images(folder / "sub", [(8, 8)])
    assert [Path(p).name for p in images.list_images(str(folder))] == ["001.png", "w.bmp", "x.PnG", "y.JPEG", "z.webp"]


def test_corrupt_image_names_the_file_or_is_skipped_and_counted(tmp_path):
    folder = make_images(tmp_path / "c", [(64, 64)] * 2)
    (folder / "bad.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match=r"bad.png.*--skip_corrupt_images"):
        build_dataset_groups([dataset_config([subset(folder)])])
    ds = build_dataset_groups([dataset_config([subset(folder)], skip_corrupt_images=True)])[0].datasets[0]
    assert len(ds.records) == 2 and [Path(p).name for p in ds.skipped_corrupt] == ["bad.png"]


def test_txt_captions_under_default_extension_warn(tmp_path, caplog):
    folder = make_images(tmp_path / "t", [(64, 64)])
    (folder / "000.txt").write_text("a real caption")
    with caplog.at_level(logging.WARNING):
        ds = build_dataset_groups([dataset_config([subset(folder, caption_extension=".caption")])])[0].datasets[0]
    assert ds.records[0].caption == "tok"
    assert 'caption_extension = ".txt"' in caplog.text
    ds = build_dataset_groups([dataset_config([subset(folder, caption_extension=".txt")])])[0].datasets[0]
    assert ds.records[0].caption == "a real caption"


def test_bucketing_off_requires_the_resolution(tmp_path):
    folder = make_images(tmp_path / "f", [(64, 64), (80, 64)])
    with pytest.raises(UserError, match=r"001.png is 80x64 but enable_bucket is off"):
        build_dataset_groups([dataset_config([subset(folder)], enable_bucket=False)])
    cfg = dataset_config([subset(folder, random_crop=True)], enable_bucket=False)
    ds = build_dataset_groups([cfg])[0].datasets[0]
    s = load_sample(ds.records[1], cfg, random.Random(0))
    assert s["image"].shape == (64, 64, 3) and s["crop_top_left"] == (0, 0) and s["original_size_hw"] == (64, 64)


def test_validation_split_is_disjoint_and_keeps_reg_out(tmp_path):
    a = make_images(tmp_path / "a", [(64, 64)] * 10)
    r = make_images(tmp_path / "r", [(64, 64)] * 3)
    cfg = dataset_config([subset(a), subset(r, is_reg=True)], validation_split=0.2)
    train, val = build_dataset_groups([cfg], seed=1)
    tr = {x.path for x in train.datasets[0].records if not x.is_reg}
    va = {x.path for x in val.datasets[0].records}
    assert len(tr) == 8 and len(va) == 2 and not tr & va
    assert not any(x.is_reg for x in val.datasets[0].records)


def test_sdxl_needs_bucket_steps_multiple_of_32(tmp_path):
    folder = make_images(tmp_path / "s", [(64, 64)])
    with pytest.raises(UserError, match="multiple of 32 for SDXL"):
        build_dataset_groups([dataset_config([subset(folder)], bucket_reso_steps=48)])
