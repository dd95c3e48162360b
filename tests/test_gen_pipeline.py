"""The generation pipeline on the tiny SDXL model: one compiled 64x64 batch-1 graph shared by most
tests; highres fix and img2img run in PyNative (no extra compile)."""

import numpy as np
import pytest

from library.errors import UserError
from library.generation import samplers
from library.generation.pipeline import Pipeline
from library.generation.requests import GenerationOptions, ImageRequest, highres_first_size
from library.resample import bilinear_resize

SIZE = 64


@pytest.fixture(scope="module")
def pipe(tiny_models):
    return Pipeline(tiny_models, GenerationOptions(batch_size=1))


def req(prompt="a red cat", seed=1, **kw):
    kw = {"width": SIZE, "height": SIZE, "steps": 3, "sampler": "euler", **kw}
    return ImageRequest(prompt, seed=seed, **kw)


def test_seeds_and_one_compiled_graph(pipe):
    a, b, a2 = pipe.generate([req(seed=1), req(seed=2), req(seed=1, negative_prompt="blurry")])
    again = pipe.generate([req(seed=1)])[0]
    assert a.image.size == (SIZE, SIZE) and a.latents.shape == (4, SIZE // 8, SIZE // 8)
    np.testing.assert_array_equal(a.latents, again.latents)          # same seed: identical
    assert np.array_equal(np.asarray(a.image), np.asarray(again.image))
    assert np.abs(a.latents - b.latents).mean() > 0.1                # another seed differs
    assert np.abs(a.latents - a2.latents).mean() > 1e-3              # the negative prompt counts
    # prompts, seeds and negatives reuse one graph; timings are recorded
    assert len(pipe.stats.graphs) == 1
    assert pipe.stats.images == 4 and pipe.stats.compile_seconds > 0 and pipe.stats.seconds_per_image > 0
    md = a.metadata
    assert md["prompt"] == "a red cat" and md["seed"] == "1" and md["sampler"] == "euler"
    assert md["parameters"].startswith("a red cat\nNegative prompt: \nSteps: 3, Sampler: Euler, CFG scale: 7.5, "
                                       "Seed: 1, Size: 64x64")


def test_every_sampler(pipe):
    """Every kohya sampler name (k_ aliases run the same function) on the one compiled graph."""
    names = sorted({samplers.canonical_name(n) for n in samplers.SAMPLER_NAMES})
    assert len(names) == 11
    out = pipe.generate([req(sampler=n, steps=4 if n == "pndm" else 2, seed=3) for n in names])
    assert [o.image.size for o in out] == [(SIZE, SIZE)] * len(names)
    assert all(np.isfinite(o.latents).all() for o in out)
    assert [o.metadata["sampler"] for o in out] == names
    assert len(pipe.stats.graphs) == 1


def test_weighting_changes_the_image(pipe):
    plain, weighted = pipe.generate([req("a red cat"), req("a (red:1.5) cat")])
    assert np.abs(plain.latents - weighted.latents).max() > 1e-4


def test_img2img_strength_zero_returns_the_vae_round_trip(pipe):
    from PIL import Image
    src = Image.fromarray(np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    out = pipe.generate([req(init_image=src, strength=0.0, seed=4)])[0]
    # strength 0 runs no step: the init latents noised to the last grid point (sigma_min for euler)
    rngs = [np.random.default_rng(4)]
    noise = rngs[0].standard_normal((4, SIZE // 8, SIZE // 8), dtype=np.float32)
    init = pipe.encode_init_images([src], SIZE, SIZE, rngs)[0]
    np.testing.assert_allclose(out.latents, init + samplers.SIGMA_MIN * noise, atol=1e-5)
    round_trip = np.asarray(pipe.decode(init[None])[0], np.float32)
    # sigma_min noise (0.03 on the scaled latents) is all that separates them: a few levels of 255
    assert np.abs(np.asarray(out.image, np.float32) - round_trip).mean() < 16.0
    # strength > 0 moves away from it; kohya's start: int(steps * strength) steps run
    moved = pipe.generate([req(init_image=src, strength=0.7, seed=4)])[0]
    assert np.abs(moved.latents - init).mean() > 0.05
    # (noise index, start index): with steps_offset 1 kohya noises one grid point above its start
    assert samplers.img2img_start("euler", 10, 0.7) == (2, 3)
    assert samplers.img2img_start("euler", 10, 1.0) == (0, 1)
    assert samplers.img2img_start("euler", 10, 0.0) == (9, 10)
    assert samplers.img2img_start("dpmsingle", 10, 0.7) == (3, 3)
    assert len(pipe.stats.graphs) == 1


def test_highres_fix_gives_the_larger_size(tiny_models):
    pipe = Pipeline(tiny_models, GenerationOptions(highres_fix_scale=0.5, highres_fix_steps=1,
                                                   highres_fix_save_1st=True, compile=False))
    out = pipe.generate([req(width=128, height=128, steps=2, strength=0.5, seed=5)])
    assert [(o.stage, o.image.size) for o in out] == [("0", (64, 64)), ("1", (128, 128))]
    assert out[1].metadata["seed"] == "5" and out[0].metadata["seed"] == "5"
    assert "Hires upscale: 2" in out[1].metadata["parameters"]
    assert highres_first_size(1024, 1024, 0.6) == (608, 608)   # int(614.9) rounded down to /32


def test_bilinear_latent_upscale():
    x = np.arange(8, dtype=np.float32).reshape(1, 1, 2, 4)
    up = bilinear_resize(x, (4, 8))
    assert up.shape == (1, 1, 4, 8)
    np.testing.assert_allclose(up[0, 0, 0], [0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3])  # torch's values
    np.testing.assert_allclose(up[0, 0, :, 0], [0, 1, 3, 4])


def test_bad_requests_fail_before_running(pipe):
    before = pipe.stats.images
    for bad in (req(width=60), req(sampler="nope"), req(sampler="pndm", steps=2),
                req(sampler="pndm", init_image=np.zeros((4, 8, 8), np.float32))):
        with pytest.raises(UserError):
            pipe.generate([req(), bad])
    assert pipe.stats.images == before


# Three sizes and two batch sizes (batch_size 2: a full batch of 64x64, then short batches)
MIXED = [dict(width=64, height=64, seed=1), dict(width=64, height=64, seed=2),
         dict(width=96, height=64, seed=3), dict(width=64, height=96, seed=4)]


def mixed_run(models, **options):
    pipe = Pipeline(models, GenerationOptions(batch_size=2, **options))
    return pipe, pipe.generate([req(**kw) for kw in MIXED])


def test_one_graph_for_every_size_and_batch_size(tiny_models):
    """The guided UNet step is one dynamic-shape graph: three latent sizes and batches of 2 and
    1 compile it once, and the images are those of the op-by-op (PyNative) run."""
    from library.training.compile import jit_api
    ms_api = jit_api()
    before = len(ms_api.ms_compile_cache)
    pipe, out = mixed_run(tiny_models)
    assert len(ms_api.ms_compile_cache) - before == 1 and len(pipe.stats.graphs) == 1
    assert [o.image.size for o in out] == [(64, 64), (64, 64), (96, 64), (64, 96)]
    _, eager = mixed_run(tiny_models, compile=False)
    for a, b in zip(out, eager):
        # graph and PyNative sum in different orders; CFG (7.5x) and the sampler's steps grow
        # that float32 rounding to a few 1e-6 of the latents' scale (about 70 here)
        np.testing.assert_allclose(a.latents, b.latents, atol=2e-5 * np.abs(b.latents).max())
        assert np.abs(np.asarray(a.image, np.int16) - np.asarray(b.image, np.int16)).max() <= 1


@pytest.mark.full
def test_dynamic_graph_images_equal_the_static_graphs(tiny_models):
    """(full: four more compiles.) --static_shapes compiles a graph per shape; same images."""
    _, dynamic = mixed_run(tiny_models)
    pipe, static = mixed_run(tiny_models, static_shapes=True)
    assert len(pipe.stats.graphs) == 3      # (2, 64x64), (1, 96x64), (1, 64x96)
    for a, b in zip(dynamic, static):
        np.testing.assert_allclose(a.latents, b.latents, rtol=1e-5, atol=1e-5)
        assert np.abs(np.asarray(a.image, np.int16) - np.asarray(b.image, np.int16)).max() <= 1


def test_one_shape_runs_its_own_graph_then_moves_to_the_open_one(pipe, tiny_models):
    """The module's runs all had one shape (64x64, batch 1): one graph of that shape, the CPU's
    faster kind. A size it has not seen moves the pipeline to the open-shape graph, once."""
    (x_shape, _, _), = pipe.stats.graphs
    assert x_shape == (1, 4, SIZE // 8, SIZE // 8)
    wide = pipe.generate([req(width=96, seed=5)])[0]
    assert len(pipe.stats.graphs) == 2 and pipe.stats.graphs[1][0] is True   # (guided, dtype)
    pipe.generate([req(seed=6), req(width=128, seed=7)])
    assert len(pipe.stats.graphs) == 2
    eager = Pipeline(tiny_models, GenerationOptions(batch_size=1, compile=False))
    ref = eager.generate([req(width=96, seed=5)])[0]
    np.testing.assert_allclose(wide.latents, ref.latents, atol=2e-5 * np.abs(ref.latents).max())
