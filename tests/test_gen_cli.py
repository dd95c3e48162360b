"""sdxl_gen_img.py end to end on the tiny checkpoint: one compiled run checked several ways, an
img2img run in PyNative, and bad inputs (which fail before the model loads)."""

import os

import numpy as np
import pytest
from PIL import Image

from tests.conftest import run_tool

PROMPTS = """# a comment line, then a blank line

a red (cat:1.3) --n blurry, dark --d 5 --s 3 --l 5.5 --c clip words --t 0.5
a red (cat:1.3) --n blurry, dark --d 5 --s 3 --l 5.5
   # an indented hash is a prompt --d 6,7 --S 3 --W 64 --H 64
a [blue] dog --ow 128 --oh 96 --nw 32 --nh 32 --ct 4 --cl 8 --d 9 --s 3
"""


@pytest.fixture(scope="module")
def main_run(tiny_ckpt, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen")
    prompts = tmp / "prompts.txt"
    prompts.write_text(PROMPTS, encoding="utf-8")
    out = tmp / "out"
    proc = run_tool("sdxl_gen_img.py", "--ckpt", tiny_ckpt, "--from_file", prompts, "--outdir", out,
                    "--W", 64, "--H", 64, "--steps", 2, "--sampler", "k_euler_a", "--images_per_prompt", 2,
                    "--seed", 1, "--sequential_file_name")
    return proc, out


def _png(path):
    img = Image.open(path)
    img.load()
    return img


def test_prompt_file_options_and_seeds(main_run):
    proc, out = main_run
    names = sorted(os.listdir(out))
    assert names == [f"im_{i:06d}.png" for i in range(1, 9)]        # 4 prompts x 2 images
    imgs = [_png(out / n) for n in names]
    assert all(img.size == (64, 64) for img in imgs)
    t = [img.text for img in imgs]
    # --d 5 (reused for the 2nd image), --s, --l, --n, --c, raw line; sampler name as typed
    assert [x["seed"] for x in t] == ["5", "5", "5", "5", "6", "7", "9", "9"]
    assert t[0]["prompt"] == "a red (cat:1.3)" and t[0]["negative-prompt"] == "blurry, dark"
    assert t[0]["steps"] == "3" and t[0]["scale"] == "5.5" and t[0]["clip-prompt"] == "clip words"
    assert t[0]["sampler"] == "k_euler_a" and t[0]["raw-prompt"].endswith("--t 0.5")
    assert t[4]["prompt"] == "# an indented hash is a prompt"   # stripped, as kohya
    assert (t[6]["original-width"], t[6]["original-height"]) == ("128", "96")
    assert (t[6]["original-width-negative"], t[6]["original-height-negative"]) == ("32", "32")
    assert (t[6]["crop-top"], t[6]["crop-left"]) == ("4", "8")
    params = t[0]["parameters"].split("\n")
    assert params[0] == "a red (cat:1.3)" and params[1] == "Negative prompt: blurry, dark"
    assert params[2].startswith("Steps: 3, Sampler: Euler a, CFG scale: 5.5, Seed: 5, Size: 64x64")
    # same seed and settings: identical pixels; other seeds differ
    px = [np.asarray(img, np.int16) for img in imgs]
    assert np.array_equal(px[0], px[1]) and np.array_equal(px[0], px[2])
    assert np.abs(px[4] - px[5]).mean() > 1 and np.abs(px[0] - px[4]).mean() > 1
    # compiled once (one size and batch), timings printed, nothing left half-written
    assert proc.stderr.count("compiled the UNet step") == 1
    assert "s/image" in proc.stdout and "8 image(s) written" in proc.stdout
    assert not [n for n in os.listdir(out) if n.startswith(".")]


def test_img2img_from_png_metadata(main_run, tmp_path):
    """img2img with prompts read back from a generated PNG; strength 0 keeps the image."""
    _, out = main_run
    src = tmp_path / "src"
    src.mkdir()
    img = _png(out / "im_000007.png")
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    for k in ("prompt", "negative-prompt"):
        info.add_text(k, img.text[k])
    img.save(src / "dog.png", pnginfo=info)
    res = tmp_path / "res"
    run_tool("sdxl_gen_img.py", "--ckpt", _ckpt(main_run),
             "--image_path", src, "--strength", 0, "--steps", 2, "--sampler", "euler", "--outdir", res,
             "--use_original_file_name", "--no_compile", "--seed", 3)
    assert os.listdir(res) == ["dog.png"]
    got = _png(res / "dog.png")
    assert got.size == (64, 64) and got.text["prompt"] == "a [blue] dog"
    assert "Denoising strength: 0.0" in got.text["parameters"]


def _ckpt(main_run):
    return main_run[0].args[main_run[0].args.index("--ckpt") + 1]


@pytest.mark.parametrize("extra, message", [
    (["--sampler", "k_heun"], "invalid choice: 'k_heun'"),
    (["--network_module", "networks.lora", "--network_weights", "missing.safetensors"], "LoRA file not found"),
    (["--W", "60"], "--W/--H 60x1024: width and height must be positive multiples of 32 for SDXL"),
    (["--H", "176"], "multiples of 32 for SDXL (e.g. 1024x160)"),
    (["--prompt", "a cat --h 1208"], "image size of prompt 'a cat' 1024x1208: width and height must "
                                     "be positive multiples of 32"),
    (["--prompt", "a cat --w 64px"], "bad value for --w"),
    (["--prompt", "a cat --zz 1"], "unknown in-prompt option --zz"),
    (["--ds_depth_1", "3"], "--ds_depth_1 (Deep Shrink) is not supported yet"),
    (["--highres_fix_upscaler", "x"], "not supported yet"),
])
def test_bad_input_exits_2_with_one_error_line(tiny_ckpt, tmp_path, extra, message):
    out = tmp_path / "out"
    args = ["--ckpt", tiny_ckpt, "--outdir", out, "--steps", 2]
    if "--prompt" not in extra:
        args += ["--prompt", "a cat"]
    proc = run_tool("sdxl_gen_img.py", *args, *extra, check=False)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_malformed_prompt_file_line(tiny_ckpt, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a good line --d 1\n\na bad line --s many\n", encoding="utf-8")
    proc = run_tool("sdxl_gen_img.py", "--ckpt", tiny_ckpt, "--from_file", prompts,
                    "--outdir", tmp_path / "out", check=False)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {prompts}:3: bad value for --s: 'many'"]
    assert not (tmp_path / "out").exists()
