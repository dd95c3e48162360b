"""LoRAs at generation time (library/generation/networks.py) on the tiny model, in PyNative so
that each freshly loaded model costs no graph compile: unmerged, merged, pre-calculated, two
LoRAs with multipliers, per-prompt --am; plus one CLI run with a LoRA."""

from dataclasses import replace

import numpy as np
import pytest

from library.errors import UserError
from library.generation.networks import GenerationNetworks
from library.generation.pipeline import Pipeline
from library.generation.requests import GenerationOptions, ImageRequest
from library.models import load_sdxl
from networks import lora
from tests.conftest import randomise_lora, run_tool


def _lora_file(tiny_ckpt, path, seed, dim=4, conv_dim=None):
    models = load_sdxl(tiny_ckpt)
    tes = [models.text_encoder1, models.text_encoder2]
    extra = {"conv_dim": str(conv_dim), "conv_alpha": "1"} if conv_dim else {}
    net = lora.create_network(1.0, dim, 2.0, None, tes, models.unet, **extra)
    randomise_lora(net, seed, up_std=0.3)
    net.save_weights(str(path))
    return str(path)


@pytest.fixture(scope="module")
def loras(tiny_ckpt, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loras")
    return (_lora_file(tiny_ckpt, tmp / "a.safetensors", 1, conv_dim=2),
            _lora_file(tiny_ckpt, tmp / "b.safetensors", 2, dim=2))


# scale 1 (no CFG): the comparisons are of LoRA application, not of 7.5x-amplified rounding
REQ = dict(width=32, height=32, steps=1, sampler="euler", seed=11, scale=1.0)


def latents(tiny_ckpt, weights=None, muls=None, requests=None, **mode):
    models = load_sdxl(tiny_ckpt)
    nets = None
    if weights:
        nets = GenerationNetworks(models, ["networks.lora"], weights, muls, **mode)
    pipe = Pipeline(models, GenerationOptions(compile=False), nets)
    reqs = requests or [ImageRequest("a red cat", **REQ)]
    return [r.latents for r in pipe.generate(reqs)], pipe


@pytest.fixture(scope="module")
def runs(tiny_ckpt, loras):
    """Final latents of one request under each way of applying the LoRAs (5 model loads)."""
    a, b = loras
    req = ImageRequest("a red cat", **REQ)
    out = {"none": latents(tiny_ckpt)[0][0]}
    (out["a"], out["a_am0"]), pipe = latents(tiny_ckpt, [a], [0.8], [req, replace(req, network_muls=(0.0,))])
    out["a_meta"] = pipe.generate([req])[0].metadata
    (out["a_merged"],), _ = latents(tiny_ckpt, [a], [0.8], merge=True)
    (out["a_pre"],), _ = latents(tiny_ckpt, [a], [0.8], pre_calc=True)
    (out["ab_b0"], out["ab"]), pipe = latents(tiny_ckpt, [a, b], [0.8, 0.0],
                                              [req, replace(req, network_muls=(0.8, 0.5))])
    out["names"] = pipe.networks.names
    (out["ab_merged"],), _ = latents(tiny_ckpt, [a, b], [0.8, 0.5], merge=True)
    return out


def test_lora_changes_the_image_and_multiplier_zero_is_none(runs):
    assert np.abs(runs["a"] - runs["none"]).max() > 1e-2
    np.testing.assert_allclose(runs["a_am0"], runs["none"], atol=1e-5)     # --am 0
    assert "Lora: \"a: 0.8\"" in runs["a_meta"]["parameters"]


def test_merged_and_pre_calculated_equal_unmerged(runs):
    assert np.abs(runs["a_merged"] - runs["a"]).max() < 1e-4
    assert np.abs(runs["a_pre"] - runs["a"]).max() < 1e-4


def test_two_loras_with_multipliers(runs):
    np.testing.assert_allclose(runs["ab_b0"], runs["a"], atol=1e-5)        # --network_mul 0.8 0
    assert np.abs(runs["ab"] - runs["a"]).max() > 1e-2                     # --am 0.8,0.5
    assert np.abs(runs["ab_merged"] - runs["ab"]).max() < 1e-4
    assert runs["names"] == ["a", "b"]


def test_network_errors(tiny_ckpt, loras, tmp_path):
    models = load_sdxl(tiny_ckpt)
    with pytest.raises(UserError, match="2 --network_mul for 1"):
        GenerationNetworks(models, ["networks.lora"], [loras[0]], [1.0, 2.0])
    with pytest.raises(UserError, match="cannot import"):
        GenerationNetworks(models, ["networks.nope"], [loras[0]])
    other = tmp_path / "other.safetensors"     # a LoRA for another model: keys that fit nothing
    from library.safetensors_io import write_safetensors
    write_safetensors(str(other), {"lora_unet_nothing_here.lora_down.weight": np.zeros((4, 8), np.float32),
                                   "lora_unet_nothing_here.lora_up.weight": np.zeros((8, 4), np.float32)})
    with pytest.raises(UserError):
        GenerationNetworks(models, ["networks.lora"], [str(other)])


def test_cli_with_a_lora(tiny_ckpt, loras, tmp_path):
    out = tmp_path / "out"
    run_tool("sdxl_gen_img.py", "--ckpt", tiny_ckpt, "--prompt", "a cat --d 4 --am 0.5", "--W", 32,
             "--H", 32, "--steps", 1, "--sampler", "euler", "--network_module", "networks.lora",
             "--network_weights", loras[0], loras[1], "--network_mul", 0.8, 0.6, "--no_compile",
             "--outdir", out, "--sequential_file_name")
    from PIL import Image
    img = Image.open(out / "im_000001.png")
    assert img.text["networks"] == "a: 0.5, b: 0.5"             # --am pads with its last value
    assert 'Lora: "a: 0.5, b: 0.5"' in img.text["parameters"]
