"""The caches with the tiny SDXL models (library/training/cache_encoders.py): what is cached is what the trainer
would compute itself, and a rerun reads it back from disk."""

import argparse

import numpy as np
from mindspore import Tensor
from PIL import Image

from library.training import cache_encoders as caching
from library.conditioning import encode_text
from library.data.cache import add_cache_arguments, check_cache_options
from library.data.images import to_chw_float
from library.text import load_tokenizers, tokenize_chunks, tokenize_weighted
from test_data_cache import group_of, make_images, subset


def args_for(argv):
    parser = argparse.ArgumentParser()
    add_cache_arguments(parser)
    parser.add_argument("--network_train_unet_only", action="store_true")
    parser.add_argument("--max_token_length", type=int, default=None)
    args = parser.parse_args(argv)
    return args


def test_latents_are_a_vae_sample_and_reload_from_disk(tmp_path, tiny_models):
    folder = make_images(tmp_path / "a", [(64, 64), (64, 64), (96, 64)])
    g = group_of([subset(folder, flip_aug=True)])
    args = args_for(["--cache_latents_to_disk", "--vae_batch_size", "2"])
    check_cache_options(args, [g])
    first = caching.cache_latents(g, tiny_models, args, progress=False)
    assert (first.computed, first.hits, first.encoded_images) == (3, 0, 6)
    rec = g.records()[0][1]
    img = np.asarray(Image.open(rec.path).convert("RGB"))
    moments = tiny_models.vae.encode(Tensor(to_chw_float(img)[None])).asnumpy()[0]
    mean, std = moments[:4], np.exp(0.5 * np.clip(moments[4:], -30, 20))
    z = (first.get(rec) - mean) / std                  # the noise the sample used
    assert abs(z.mean()) < 0.5 and 0.5 < z.std() < 1.5
    second = caching.cache_latents(g, tiny_models, args, progress=False)
    assert (second.computed, second.hits) == (0, 3)
    for _, r in g.records():
        assert np.array_equal(first.get(r, True), second.get(r, True))


def test_text_outputs_match_direct_encoding(tmp_path, tiny_models):
    folder = make_images(tmp_path / "a", [(64, 64)] * 2, captions=["a (red:1.3) fox", "a [blue] bird, snow"])
    g = group_of([subset(folder, caption_extension=".caption")])
    tok1, tok2 = load_tokenizers()
    # the weighted, chunked variant (the plain one is the same code path without weights)
    for argv in (["--cache_text_encoder_outputs_to_disk", "--weighted_captions", "--max_token_length", "150"],):
        args = args_for(argv + ["--network_train_unet_only"])
        check_cache_options(args, [g])
        cache = caching.cache_text_outputs(g, tiny_models, args, progress=False)
        captions = ["a (red:1.3) fox", "a [blue] bird, snow"]
        if args.weighted_captions:
            (i1, w1), (i2, w2) = tokenize_weighted(tok1, captions, 150), tokenize_weighted(tok2, captions, 150)
        else:
            i1, i2, w1, w2 = tokenize_chunks(tok1, captions), tokenize_chunks(tok2, captions), None, None
        ctx, pooled = encode_text(tiny_models.text_encoder1, tiny_models.text_encoder2, i1, i2, w1, w2)
        for k, (_, rec) in enumerate(g.records()):
            c, p = cache.get(rec)
            assert c.shape == (152, ctx.shape[-1])
            assert np.allclose(c, ctx.asnumpy()[k], atol=1e-5) and np.allclose(p, pooled.asnumpy()[k], atol=1e-5)
        assert caching.cache_text_outputs(g, tiny_models, args, progress=False).hits == 2


def test_model_identity_depends_on_the_weights(tiny_models):
    a = caching.model_identity(tiny_models.vae)
    assert a == caching.model_identity(tiny_models.vae)
    assert a != caching.model_identity(tiny_models.text_encoder1)
