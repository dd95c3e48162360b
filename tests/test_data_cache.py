"""Latent and text-encoder output caches (library/data/cache/) with counting fake encoders:
hits on a rerun, exactly the affected entries recomputed when an input changes, unreadable
files recomputed, flip_aug and alpha_mask entries, and kohya's contradiction errors."""

import argparse
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from library.data import cache as C, images
from library.data.captions import CaptionOptions
from library.data.config_schema import DatasetConfig, SubsetConfig
from library.data.dataset import build_dataset_groups
from library.data.loader import BatchLoader
from library.errors import UserError

SIZES = [(64, 64), (96, 64), (64, 128)]


def make_images(folder, sizes=SIZES, captions=None, alpha=False):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(folder)))
    mode = "RGBA" if alpha else "RGB"
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, len(mode)), dtype=np.uint8), mode).save(folder / f"{i:03d}.png")
        if captions:
            (folder / f"{i:03d}.caption").write_text(captions[i])
    return folder


def subset(folder, **kw):
    caption = {k: kw.pop(k) for k in list(kw) if k in CaptionOptions.__dataclass_fields__}
    return SubsetConfig(image_dir=str(folder), class_tokens=kw.pop("class_tokens", "tok"), where=f"subset {folder.name}",
                        caption=CaptionOptions(**caption), **kw)


def group_of(*subsets_per_dataset, resolution=(64, 64)):
    configs = []
    for i, subs in enumerate(subsets_per_dataset):
        res = resolution[i] if isinstance(resolution, list) else resolution
        configs.append(DatasetConfig(subsets=tuple(subs), is_dreambooth=True, resolution=res, enable_bucket=True,
                                     min_bucket_reso=32, max_bucket_reso=256, bucket_reso_steps=32,
                                     where=f"datasets[{i}]"))
    return build_dataset_groups(configs)[0]


class FakeVAE:
    """Latent = 8x8 average pool of the image (first 4 channels: RGB + mean) + seeded noise."""

    def __init__(self):
        self.images = 0

    def __call__(self, batch, seeds):
        self.images += len(batch)
        b, h, w, _ = batch.shape
        x = batch.astype(np.float32).reshape(b, h // 8, 8, w // 8, 8, 3).mean((2, 4)).transpose(0, 3, 1, 2)
        x = np.concatenate([x, x.mean(1, keepdims=True)], 1) / 255.0
        noise = np.stack([np.random.default_rng(s).standard_normal(x.shape[1:], dtype=np.float32) for s in seeds])
        return x + 0.01 * noise


class FakeTE:
    def __init__(self):
        self.captions = []

    def __call__(self, captions):
        self.captions += captions
        ctx = np.stack([np.full((77, 8), len(c), np.float32) for c in captions])
        return ctx, np.stack([np.full(4, hash(c) % 97, np.float32) for c in captions])


def latents(group, vae, model="vae-a", **kw):
    return C.build_latent_cache(group, vae, model, to_disk=kw.pop("to_disk", True), progress=False, **kw)


def test_rerun_hits_and_values_are_identical(tmp_path):
    g = group_of([subset(make_images(tmp_path / "a"), flip_aug=True)])
    vae = FakeVAE()
    first = latents(g, vae, batch_size=2)
    assert (first.computed, first.hits, vae.images) == (3, 0, 6)      # flipped latents are a second pass
    second = latents(g, FakeVAE())
    assert (second.computed, second.hits) == (3 - 3, 3)
    for _, rec in g.records():
        for flipped in (False, True):
            assert np.array_equal(first.get(rec, flipped), second.get(rec, flipped))
    assert sorted(p.name for p in (tmp_path / "a").glob("*.npz")) == [
        "000_0064x0064_sdxl.npz", "001_0096x0064_sdxl.npz", "002_0064x0128_sdxl.npz"]


def test_in_memory_cache_writes_nothing(tmp_path):
    g = group_of([subset(make_images(tmp_path / "a"))])
    c = latents(g, FakeVAE(), to_disk=False)
    assert c.computed == 3 and not list((tmp_path / "a").glob("*.npz"))
    rec = g.records()[1][1]
    assert c.get(rec).shape == (4, rec.bucket.bucket_wh[1] // 8, rec.bucket.bucket_wh[0] // 8)


def test_latent_is_one_fixed_sample_independent_of_batching(tmp_path):
    g = group_of([subset(make_images(tmp_path / "a", [(64, 64)] * 4))])
    one = latents(g, FakeVAE(), to_disk=False, batch_size=1)
    four = latents(g, FakeVAE(), to_disk=False, batch_size=4)
    for _, rec in g.records():
        assert np.array_equal(one.get(rec), four.get(rec))


def test_changed_image_recomputes_only_that_entry(tmp_path):
    folder = make_images(tmp_path / "a")
    g = group_of([subset(folder)])
    latents(g, FakeVAE())
    Image.fromarray(np.zeros((64, 96, 3), np.uint8)).save(folder / "001.png")   # same size, new content
    again = latents(group_of([subset(folder)]), FakeVAE())
    assert (again.computed, again.hits) == (1, 2)


def test_changed_resolution_recomputes_only_that_dataset(tmp_path):
    a, b = make_images(tmp_path / "a"), make_images(tmp_path / "b")
    latents(group_of([subset(a)], [subset(b)], resolution=[(64, 64), (64, 64)]), FakeVAE())
    again = latents(group_of([subset(a)], [subset(b)], resolution=[(64, 64), (96, 96)]), FakeVAE())
    assert (again.computed, again.hits) == (3, 3)


def test_same_image_at_two_resolutions_shares_one_file(tmp_path):
    a = make_images(tmp_path / "a")
    g = group_of([subset(a)], [subset(a)], resolution=[(64, 64), (128, 128)])
    first = latents(g, FakeVAE())
    assert first.computed == 6 and len(list(a.glob("*.npz"))) == 3
    second = latents(g, FakeVAE())
    assert (second.computed, second.hits) == (0, 6)
    (_, r64), (_, r128) = g.records()[0], g.records()[3]
    assert second.get(r64).shape[1:] != second.get(r128).shape[1:]


def test_changed_model_or_flags_recompute(tmp_path):
    folder = make_images(tmp_path / "a")
    latents(group_of([subset(folder)]), FakeVAE())
    assert latents(group_of([subset(folder)]), FakeVAE(), model="vae-b").computed == 3
    assert latents(group_of([subset(folder, flip_aug=True)]), FakeVAE(), model="vae-b").computed == 3
    assert latents(group_of([subset(folder, flip_aug=True)]), FakeVAE(), model="vae-b").hits == 3


def test_key_is_stored_and_checked(tmp_path):
    folder = make_images(tmp_path / "a")
    g = group_of([subset(folder)])
    latents(g, FakeVAE())
    rec = g.records()[0][1]
    path = C.latents_path(rec)
    entries = C.read_cache_file(path)
    (eid, entry), = entries.items()
    key = json.loads(entry.key)
    assert key["image_sha256"] == images.file_digest(rec.path)
    assert key["bucket_wh"] == [64, 64] and key["vae"] == "vae-a" and key["kind"] == "sdxl_latents"
    # an entry whose stored key does not match its inputs is a miss, even under the right name
    C.write_cache_file(path, {eid: {"key": entry.key.replace("vae-a", "vae-x"), "latents": entry.array("latents")}})
    again = latents(g, FakeVAE())
    assert (again.computed, again.hits) == (1, 2)


def test_truncated_file_is_recomputed_not_read(tmp_path, caplog):
    folder = make_images(tmp_path / "a")
    g = group_of([subset(folder)])
    first = latents(g, FakeVAE())
    path = C.latents_path(g.records()[2][1])
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:len(data) // 2])
    with caplog.at_level(logging.WARNING):
        again = latents(g, FakeVAE())
    assert (again.computed, again.hits, again.corrupt) == (1, 2, 1)
    assert "cannot be read" in caplog.text and os.path.basename(path) in caplog.text
    assert np.array_equal(again.get(g.records()[2][1]), first.get(g.records()[2][1]))
    assert C.read_cache_file(path)        # rewritten whole


def test_no_temporary_files_are_left(tmp_path):
    folder = make_images(tmp_path / "a")
    latents(group_of([subset(folder)]), FakeVAE())
    assert not [p for p in os.listdir(folder) if p.startswith(".tmp")]


def test_flip_aug_stores_both_latents_and_alpha_mask(tmp_path):
    folder = make_images(tmp_path / "a", alpha=True)
    g = group_of([subset(folder, flip_aug=True, alpha_mask=True)])
    c = latents(g, FakeVAE())
    rec = g.records()[0][1]                     # 64x64: already the bucket's size
    names = C.read_cache_file(C.latents_path(rec))
    ((eid, entry),) = names.items()
    assert entry.has("latents") and entry.has("latents_flipped") and entry.has("alpha_mask")
    img = np.asarray(Image.open(rec.path))
    seed = int(eid, 16)                         # the noise seed is the entry's name (flipped: ^ 1)
    assert np.array_equal(c.get(rec), FakeVAE()(np.ascontiguousarray(img[None, :, :, :3]), [seed])[0])
    assert np.array_equal(c.get(rec, flipped=True),
                          FakeVAE()(np.ascontiguousarray(img[None, :, ::-1, :3]), [seed ^ 1])[0])
    assert np.allclose(c.alpha_mask(rec), img[..., 3] / 255.0)
    assert np.allclose(c.alpha_mask(rec, flipped=True), img[:, ::-1, 3] / 255.0)


def test_skip_cache_check_uses_size_and_mtime(tmp_path):
    folder = make_images(tmp_path / "a")
    g = group_of([subset(folder)])
    assert latents(g, FakeVAE(), skip_cache_check=True).computed == 3
    assert latents(g, FakeVAE(), skip_cache_check=True).hits == 3
    os.utime(folder / "000.png", ns=(1, 1))
    assert latents(g, FakeVAE(), skip_cache_check=True).computed == 1


def test_loader_with_latent_cache_gives_latents_and_the_same_captions(tmp_path):
    folder = make_images(tmp_path / "a", captions=["a, b, c", "d, e", "f"])
    g = group_of([subset(folder, flip_aug=True, caption_extension=".caption", shuffle_caption=True)])
    c = latents(g, FakeVAE(), to_disk=False)
    plain = [s for b in BatchLoader(g, seed=3).epoch(1) for s in b]
    cached = [s for b in BatchLoader(g, seed=3, latent_cache=c).epoch(1) for s in b]
    assert [s["caption"] for s in plain] == [s["caption"] for s in cached]
    assert [s["flipped"] for s in plain] == [s["flipped"] for s in cached]
    for s in cached:
        assert s["image"] is None and s["latents"].shape == (4, s["bucket_wh"][1] // 8, s["bucket_wh"][0] // 8)


# ------------------------------------------------------------------------- text-encoder outputs
def texts(group, te, to_disk=True, **kw):
    return C.build_text_cache(group, te, kw.pop("model", "te-a"), to_disk=to_disk, progress=False, **kw)


def test_text_cache_rerun_and_changed_caption(tmp_path):
    folder = make_images(tmp_path / "a", captions=["a cat", "a dog", "a cat"])
    g = group_of([subset(folder, caption_extension=".caption")])
    te = FakeTE()
    first = texts(g, te)
    assert (first.computed, first.hits, sorted(te.captions)) == (3, 0, ["a cat", "a dog"])   # shared caption once
    assert texts(g, FakeTE()).hits == 3
    (folder / "001.caption").write_text("a bird")
    te = FakeTE()
    again = texts(group_of([subset(folder, caption_extension=".caption")]), te)
    assert (again.computed, again.hits, te.captions) == (1, 2, ["a bird"])
    ctx, pooled = again.get(g.records()[0][1])
    assert ctx.shape == (77, 8) and ctx[0, 0] == len("a cat")


def test_text_cache_key_has_token_length_weighting_and_prefix(tmp_path):
    folder = make_images(tmp_path / "a", captions=["x", "y", "z"])
    g = group_of([subset(folder, caption_extension=".caption")])
    texts(g, FakeTE())
    assert texts(g, FakeTE(), max_token_length=150).computed == 3
    assert texts(g, FakeTE(), max_token_length=150, weighted=True).computed == 3
    assert texts(g, FakeTE(), max_token_length=150, weighted=True, model="te-b").computed == 3
    te = FakeTE()
    prefixed = group_of([subset(folder, caption_extension=".caption", caption_prefix="photo of")])
    assert texts(prefixed, te, max_token_length=150, weighted=True, model="te-b").computed == 3
    assert te.captions == ["photo of x", "photo of y", "photo of z"]      # kohya would encode "x", "y", "z"


def test_text_cache_truncated_file(tmp_path):
    folder = make_images(tmp_path / "a", captions=["x", "y", "z"])
    g = group_of([subset(folder, caption_extension=".caption")])
    texts(g, FakeTE())
    Path(C.text_path(g.records()[0][1])).write_bytes(b"PK\x03\x04garbage")
    again = texts(g, FakeTE())
    assert (again.computed, again.hits, again.corrupt) == (1, 2, 1)


def test_loader_attaches_text_outputs(tmp_path):
    folder = make_images(tmp_path / "a", captions=["x", "y", "z"])
    g = group_of([subset(folder, caption_extension=".caption")])
    t = texts(g, FakeTE(), to_disk=False)
    for batch in BatchLoader(g, seed=0, text_cache=t).epoch(1):
        for s in batch:
            assert s["text_context"][0, 0] == len(s["caption"])


# ------------------------------------------------------------------------- contradictions
def args_for(**kw):
    parser = argparse.ArgumentParser()
    C.add_cache_arguments(parser)
    ns = parser.parse_args([])
    ns.network_train_unet_only = kw.pop("network_train_unet_only", True)
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns


def test_to_disk_flags_imply_the_cache_flags(tmp_path):
    g = group_of([subset(make_images(tmp_path / "a"))])
    args = args_for(cache_latents_to_disk=True, cache_text_encoder_outputs_to_disk=True)
    C.check_cache_options(args, [g, None])
    assert args.cache_latents and args.cache_text_encoder_outputs


@pytest.mark.parametrize("key", ["color_aug", "random_crop"])
def test_latent_cache_refuses_augmentations(tmp_path, key):
    g = group_of([subset(make_images(tmp_path / "a"), **{key: True})])
    with pytest.raises(UserError, match=f"subset a: {key} cannot be used with --cache_latents_to_disk"):
        C.check_cache_options(args_for(cache_latents_to_disk=True), [g])
    C.check_cache_options(args_for(cache_text_encoder_outputs=True), [g])     # fine for the text cache


@pytest.mark.parametrize("kw,name", [
    ({"shuffle_caption": True}, "shuffle_caption"),
    ({"caption_dropout_rate": 0.1}, "caption_dropout_rate = 0.1"),
    ({"caption_tag_dropout_rate": 0.2}, "caption_tag_dropout_rate = 0.2"),
    ({"token_warmup_step": 10}, "token_warmup_step = 10"),
    ({"caption_dropout_every_n_epochs": 2}, "caption_dropout_every_n_epochs = 2"),
    ({"enable_wildcard": True}, "enable_wildcard"),
])
def test_text_cache_refuses_changing_captions(tmp_path, kw, name):
    g = group_of([subset(make_images(tmp_path / "a"), **kw)])
    with pytest.raises(UserError, match=f"subset a: {name} cannot be used with --cache_text_encoder_outputs"):
        C.check_cache_options(args_for(cache_text_encoder_outputs=True), [g])
    C.check_cache_options(args_for(cache_latents=True), [g])                # fine for the latent cache


def test_text_cache_needs_unet_only_and_lists_every_conflict(tmp_path):
    g = group_of([subset(make_images(tmp_path / "a"), color_aug=True, shuffle_caption=True)])
    with pytest.raises(UserError) as e:
        C.check_cache_options(args_for(cache_latents=True, cache_text_encoder_outputs=True,
                                       network_train_unet_only=False), [g])
    msg = str(e.value)
    assert "--network_train_unet_only" in msg and "color_aug" in msg and "shuffle_caption" in msg
