"""Mask-image datasets (kohya's `conditioning_data_dir` with --masked_loss, docs/masked_loss_README.md):
the TOML schema, the pairing of images and masks, the mask a sample carries (decoded and from
the latent cache) and the messages for what kohya refuses."""

import json
import random

import numpy as np
import pytest
from PIL import Image

from library.data import cache as C
from library.data.config import add_dataset_arguments, resolve_dataset_configs
from library.data.dataset import build_dataset_groups
from library.data.examples import load_sample
from library.errors import UserError


def parse(argv):
    import argparse
    p = argparse.ArgumentParser()
    add_dataset_arguments(p)
    p.add_argument("--masked_loss", action="store_true")
    return p.parse_args(argv)


def mask_dataset(root, sizes=((96, 64), (64, 64)), masks=None):
    """Images with a caption each, and a folder of masks: white left half, grey (128) right."""
    img, msk = root / "img", root / "mask"
    img.mkdir(parents=True)
    msk.mkdir()
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(img / f"{i}.png")
        (img / f"{i}.txt").write_text(f"picture {i}")
        m = np.full((h, w), 128, np.uint8)
        m[:, : w // 2] = 255
        # an RGB mask whose G and B differ: kohya reads the R channel only
        Image.fromarray(np.stack([m, 255 - m, np.zeros_like(m)], -1)).save(msk / f"{i}.png")
    return img, msk


def write_toml(path, img, msk, extra=""):
    path.write_text(f"""
[general]
enable_bucket = true
resolution = 64
min_bucket_reso = 32
max_bucket_reso = 128
bucket_reso_steps = 32
{extra}
[[datasets]]
  [[datasets.subsets]]
  image_dir = "{img}"
  caption_extension = ".txt"
  conditioning_data_dir = "{msk}"
""")
    return path


def test_mask_images_give_each_sample_its_mask(tmp_path):
    img, msk = mask_dataset(tmp_path)
    cfg = write_toml(tmp_path / "d.toml", img, msk, "flip_aug = true")
    [ds] = resolve_dataset_configs(parse(["--dataset_config", str(cfg), "--masked_loss"]))
    assert ds.subsets[0].conditioning_data_dir == str(msk) and ds.subsets[0].masked
    group, _ = build_dataset_groups([ds])
    records = {r.path: r for r in group.datasets[0].records}
    wide = records[str(img / "0.png")]
    assert wide.mask_path == str(msk / "0.png")
    bw, bh = wide.bucket.bucket_wh        # resized and centre-cropped into its bucket

    class Never(random.Random):
        def random(self):
            return 0.9     # no flip

    class Always(random.Random):
        def random(self):
            return 0.1     # flip

    sample = load_sample(wide, ds, Never(0))
    mask = sample["alpha_mask"]
    assert mask.shape == (bh, bw) and sample["image"].shape == (bh, bw, 3)
    assert np.allclose(mask[:, 0], 1.0) and np.allclose(mask[:, -1], 128 / 255, atol=1 / 255)
    flipped = load_sample(wide, ds, Always(0))["alpha_mask"]
    assert np.allclose(flipped, mask[:, ::-1])

    # cached latents carry the same mask, and a changed mask is a cache miss
    class VAE:
        def __call__(self, batch, seeds):
            b, h, w, _ = batch.shape
            return np.zeros((b, 4, h // 8, w // 8), np.float32)

    cache = C.build_latent_cache(group, VAE(), "vae", to_disk=True, progress=False)
    assert np.array_equal(cache.alpha_mask(wide), mask)
    assert np.array_equal(cache.alpha_mask(wide, flipped=True), flipped)
    cached = load_sample(wide, ds, Never(0), latent_cache=cache)
    assert np.array_equal(cached["alpha_mask"], mask)
    m = np.zeros((64, 96), np.uint8)
    Image.fromarray(m).save(msk / "0.png")
    again = C.build_latent_cache(group, VAE(), "vae", to_disk=True, progress=False)
    assert (again.computed, again.hits) == (1, 1)
    assert np.array_equal(again.alpha_mask(wide), np.zeros((bh, bw), np.float32))


def test_mask_images_need_masked_loss(tmp_path):
    img, msk = mask_dataset(tmp_path)
    cfg = write_toml(tmp_path / "d.toml", img, msk)
    with pytest.raises(UserError, match=r"`conditioning_data_dir` \(mask images\) needs --masked_loss"):
        resolve_dataset_configs(parse(["--dataset_config", str(cfg)]))


def test_kohya_mask_dataset_refusals_are_listed_together(tmp_path):
    img, msk = mask_dataset(tmp_path)
    (msk / "0.png").unlink()                                           # an image without its mask
    Image.new("RGB", (8, 8)).save(msk / "stray.png")                   # a mask without an image
    Image.new("RGB", (32, 32)).save(msk / "1.png")                     # a mask of another size
    cfg = write_toml(tmp_path / "d.toml", img, msk)
    [ds] = resolve_dataset_configs(parse(["--dataset_config", str(cfg), "--masked_loss"]))
    with pytest.raises(UserError) as e:
        build_dataset_groups([ds])
    message = str(e.value)
    assert "1 images have no mask image of the same name" in message and "0.png" in message
    assert "stray.png" in message and "1.png is 32x32, its image 64x64" in message


def test_mask_dataset_schema_is_kohyas(tmp_path):
    img, msk = mask_dataset(tmp_path)
    cfg = write_toml(tmp_path / "d.toml", img, msk, "random_crop = true")
    with pytest.raises(UserError, match="`random_crop`.*cannot be used with mask images"):
        resolve_dataset_configs(parse(["--dataset_config", str(cfg), "--masked_loss"]))
    # kohya's mask subsets have no is_reg or alpha_mask, and all subsets of the dataset have masks
    cfg.write_text(cfg.read_text().replace('conditioning_data_dir', 'is_reg = true\n  alpha_mask = true\n'
                                           '  conditioning_data_dir')
                   + f'  [[datasets.subsets]]\n  image_dir = "{img}"\n')
    with pytest.raises(UserError) as e:
        resolve_dataset_configs(parse(["--dataset_config", str(cfg), "--masked_loss"]))
    assert "every subset of the dataset needs them" in str(e.value)


def test_one_run_reports_every_bad_key_of_a_dataset_toml(tmp_path):
    cfg = tmp_path / "d.toml"
    cfg.write_text("""
[general]
resolution = "1024"
flip_agu = true
[[datasets]]
batch_size = 0
  [[datasets.subsets]]
  image_dir = "/a"
  num_repeats = 0
  [[datasets.subsets]]
  image_dir = "/b"
  caption_dropout_rate = 2.0
""")
    with pytest.raises(UserError) as e:
        resolve_dataset_configs(parse(["--dataset_config", str(cfg)]))
    # the schema pass: both key/type problems at once
    assert str(e.value).startswith("2 problems in")
    assert "`resolution` = '1024' has the wrong type" in str(e.value) and "flip_agu" in str(e.value)
    cfg.write_text(cfg.read_text().replace('resolution = "1024"\nflip_agu = true', "resolution = 64"))
    with pytest.raises(UserError) as e:
        resolve_dataset_configs(parse(["--dataset_config", str(cfg)]))
    # the value pass: each subset's problem, then the dataset's
    lines = str(e.value).splitlines()
    assert lines[0].startswith("2 problems in") and "num_repeats" in lines[1] and "caption_dropout_rate" in lines[2]


def test_inspect_dataset_shows_each_images_mask(tmp_path):
    from conftest import run_tool
    img, msk = mask_dataset(tmp_path)
    cfg = write_toml(tmp_path / "d.toml", img, msk)
    proc = run_tool("tools/inspect_dataset.py", "--dataset_config", cfg, "--masked_loss", "--json")
    images = {im["path"]: im["mask"] for im in json.loads(proc.stdout)["images"]}
    assert images == {str(img / "0.png"): str(msk / "0.png"), str(img / "1.png"): str(msk / "1.png")}
