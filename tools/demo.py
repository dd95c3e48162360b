"""`make demo`: the embedded default run on the tiny SDXL model, end to end on CPU.

    python tools/demo.py --out demo_out [--steps 8] [--seed 0]

What it does, with the models this project builds (training arrives with the training issue):
  1. writes the tiny SDXL checkpoint (tools/make_tiny_sdxl.py, seed 0) and loads it strictly;
  2. draws a test picture and round-trips it through the VAE (encode -> sample -> decode);
  3. encodes a prompt with both text encoders as SDXL does (penultimate hidden states of TE1 and
     TE2 concatenated, TE2's projected pooled output plus the size embedding), and runs an Euler
     sampler on the UNet compiled in graph mode, then decodes the latent;
  4. writes demo_out/demo.png (picture | VAE round trip | generated sample) and prints timings.
The tiny model's weights are random, so the generated sample is structured noise: the demo shows
that every part runs and how fast, not a trained model.
"""

import argparse
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from library.errors import exit_on_user_error  # noqa: E402

PROMPT = "a red circle and a blue square on a white background"
SIZE = 256   # pixels; the latent is SIZE / 8


def draw_picture(size):
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(img)
    d.ellipse([size * 0.1, size * 0.15, size * 0.5, size * 0.55], fill=(220, 30, 30))
    d.rectangle([size * 0.55, size * 0.45, size * 0.9, size * 0.85], fill=(30, 60, 220))
    return img


def to_tensor(img):
    from mindspore import Tensor
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return Tensor(arr.transpose(2, 0, 1)[None])


def to_image(t):
    from PIL import Image
    arr = np.clip((t.asnumpy()[0].transpose(1, 2, 0) + 1.0) * 127.5, 0, 255)
    return Image.fromarray(arr.round().astype(np.uint8))


def euler_sigmas(steps):
    """Sigmas of the SDXL DDPM schedule (scaled_linear 0.00085-0.012, 1000 steps), Euler style."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1.0 - betas)
    timesteps = np.linspace(999, 0, steps)
    all_sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
    sigmas = np.interp(timesteps, np.arange(1000), all_sigmas)
    return timesteps, np.append(sigmas, 0.0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="demo_out")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)

    import mindspore as ms
    from mindspore import Tensor
    from PIL import Image
    from library.conditioning import encode_text, vector_condition
    from library.models import load_sdxl
    from library.text import load_tokenizers, tokenize_chunks

    ckpt = os.path.join(args.out, "tiny_sdxl.safetensors")
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_tiny_sdxl.py"), "--out",
                    ckpt, "--seed", "0"], check=True)
    start = time.time()
    models = load_sdxl(ckpt)
    print(f"loaded {ckpt} in {time.time() - start:.1f} s")
    scale = models.config.vae.scaling_factor
    rng = np.random.default_rng(args.seed)

    picture = draw_picture(SIZE)
    start = time.time()
    moments = models.vae.encode(to_tensor(picture))
    noise = Tensor(rng.standard_normal((1, 4, SIZE // 8, SIZE // 8), dtype=np.float32))
    latent = models.vae.sample_latent(moments, noise) * scale
    round_trip = to_image(models.vae.decode(latent / scale))
    print(f"VAE round trip of a {SIZE}x{SIZE} picture: {time.time() - start:.1f} s")

    tok1, tok2 = load_tokenizers()
    context, pooled = encode_text(models.text_encoder1, models.text_encoder2,
                                  tokenize_chunks(tok1, [PROMPT]), tokenize_chunks(tok2, [PROMPT]))
    sizes = Tensor(np.array([[SIZE, SIZE]], np.float32))
    y = vector_condition(pooled, sizes, sizes * 0, sizes, models.config.unet.size_embed_dim)
    unet = ms.jit(models.unet.construct)
    timesteps, sigmas = euler_sigmas(args.steps)
    x = Tensor(rng.standard_normal((1, 4, SIZE // 8, SIZE // 8), dtype=np.float32) * sigmas[0])
    step_times = []
    for i, t in enumerate(timesteps):
        start = time.time()
        sigma = float(sigmas[i])
        eps = unet(x / (sigma ** 2 + 1) ** 0.5, Tensor(np.array([t], np.float32)), context, y)
        x = x + eps * float(sigmas[i + 1] - sigma)     # Euler: dx/dsigma = eps
        x.asnumpy()
        step_times.append(time.time() - start)
    sample = to_image(models.vae.decode(x / scale))
    print(f"Euler sampling, {args.steps} steps at {SIZE}x{SIZE}: first step (graph compile) "
          f"{step_times[0]:.1f} s, then {np.median(step_times[1:]):.3f} s/step")

    grid = Image.new("RGB", (SIZE * 3, SIZE), "white")
    for i, img in enumerate((picture, round_trip, sample)):
        grid.paste(img, (i * SIZE, 0))
    path = os.path.join(args.out, "demo.png")
    grid.save(path)
    print(f"wrote {path}: the drawn picture | its VAE round trip | a sample for {PROMPT!r}.")
    print("The tiny model has random weights, so both right-hand panels are noise-like: this "
          "demo shows the pipeline runs; training (coming next) makes it learn.")


if __name__ == "__main__":
    exit_on_user_error(main)
