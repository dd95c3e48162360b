"""`make demo`: the embedded default run, end to end on CPU in a few minutes.

    python tools/demo.py --out demo_out [--steps 150] [--seed 0]

1. writes the tiny SDXL checkpoint (tools/make_tiny_sdxl.py, seed 0: random weights, the real
   SDXL key format; its VAE calibrated so scaled latents have unit variance, as SDXL's do) and
   draws a small captioned dataset of coloured shapes with a kohya dataset
   TOML;
2. trains a LoRA on it with sdxl_train_network.py (graph mode, cached latents and text-encoder
   outputs, UNet LoRA), which writes the LoRA, its step log and its loss curve;
3. with the LoRA's multiplier at 0 (the base model) and at 1: denoises each training latent
   from t=500 in one UNet step, and samples each caption through the generation pipeline (one
   compiled UNet step, the LoRA applied unmerged);
4. writes demo_out/demo_grid.png and prints how much closer the LoRA's results are to the
   training latents than the base model's.

The tiny model's VAE has random weights, so decoded pixels are not pictures of shapes; the
measure and the grid therefore compare latents (what the UNet and the LoRA produce), shown as
"latent previews" (the first three latent channels as RGB, like ComfyUI's previews), next to
the decoded images.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from library.errors import UserError, exit_on_user_error  # noqa: E402

SIZE = 128
SHAPES = [("a red circle", (210, 40, 40), "circle"),
          ("a blue square", (40, 60, 210), "square"),
          ("a green triangle", (40, 170, 60), "triangle"),
          ("a yellow circle on the left", (230, 200, 30), "left")]


def draw_shape(color, shape, size=SIZE):
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(img)
    s = size
    if shape == "circle":
        d.ellipse([s * .2, s * .2, s * .8, s * .8], fill=color)
    elif shape == "square":
        d.rectangle([s * .22, s * .22, s * .78, s * .78], fill=color)
    elif shape == "triangle":
        d.polygon([(s * .5, s * .15), (s * .85, s * .8), (s * .15, s * .8)], fill=color)
    else:
        d.ellipse([s * .05, s * .3, s * .45, s * .7], fill=color)
    return img


def make_dataset(root):
    images = os.path.join(root, "shapes")
    os.makedirs(images, exist_ok=True)
    for i, (caption, color, shape) in enumerate(SHAPES):
        draw_shape(color, shape).save(os.path.join(images, f"{i}.png"))
        with open(os.path.join(images, f"{i}.txt"), "w") as f:
            f.write(caption)
    toml = os.path.join(root, "dataset.toml")
    with open(toml, "w") as f:
        f.write(f'[general]\nenable_bucket = true\ncaption_extension = ".txt"\n'
                f'min_bucket_reso = 64\nmax_bucket_reso = 256\nbucket_reso_steps = 32\n\n'
                f'[[datasets]]\nresolution = {SIZE}\nbatch_size = 2\n\n'
                f'  [[datasets.subsets]]\n  image_dir = "{images}"\n  num_repeats = 5\n')
    return images, toml


DENOISE_T = 500


def denoise_once(models, caption, latent, noise, t):
    """Noise `latent` to timestep t and predict it back in one UNet call (x0 from epsilon), with
    the conditioning the LoRA was trained on: (noisy latent, predicted latent)."""
    from mindspore import Tensor
    from library.conditioning import encode_text, vector_condition
    from library.text import load_tokenizers, tokenize_chunks
    from library.training.noise_draws import ddpm_schedule
    a = float(ddpm_schedule().alphas_cumprod[t])
    noisy = np.sqrt(a) * latent + np.sqrt(1 - a) * noise
    tok1, tok2 = load_tokenizers()
    context, pooled = encode_text(models.text_encoder1, models.text_encoder2,
                                  tokenize_chunks(tok1, [caption]), tokenize_chunks(tok2, [caption]))
    size = Tensor(np.array([[SIZE, SIZE]], np.float32))
    y = vector_condition(pooled, size, size * 0, size, models.config.unet.size_embed_dim)
    eps = models.unet(Tensor(noisy[None].astype(np.float32)), Tensor(np.array([t], np.float32)),
                      context, y).asnumpy()[0]
    return noisy, (noisy - np.sqrt(1 - a) * eps) / np.sqrt(a)


def latent_preview(latents, lo, hi, size=SIZE):
    """Channels 0-2 as RGB, scaled by a shared range so that previews compare."""
    from PIL import Image
    rgb = np.clip((latents[:3].transpose(1, 2, 0) - lo) / (hi - lo), 0, 1)
    img = Image.fromarray((rgb * 255).round().astype(np.uint8))
    return img.resize((size, size), Image.NEAREST)


def label(img, text):
    from PIL import ImageDraw
    d = ImageDraw.Draw(img)
    d.rectangle([0, 0, img.width, 12], fill="white")
    d.text((2, 0), text, fill="black")
    return img


def train(args, ckpt, toml, out):
    """Run sdxl_train_network.py on the demo dataset; returns its wall time in seconds."""
    print(f"training a LoRA for {args.steps} steps (the first step compiles the graph) ...",
          flush=True)
    train_start = time.time()
    command = [sys.executable, os.path.join(ROOT, "sdxl_train_network.py"),
               "--pretrained_model_name_or_path", ckpt, "--dataset_config", toml,
               "--network_module", "networks.lora", "--network_dim", "16", "--network_alpha", "16",
               "--network_train_unet_only", "--cache_latents", "--cache_text_encoder_outputs",
               "--learning_rate", "2e-3", "--lr_scheduler", "cosine", "--lr_warmup_steps", "0.05",
               "--max_train_steps", str(args.steps), "--seed", str(args.seed),
               "--max_data_loader_n_workers", "0", "--output_dir", out,
               "--output_name", "shapes_lora"]
    proc = subprocess.run(command, env=dict(os.environ, PYTHONPATH=ROOT))
    if proc.returncode:
        raise UserError(f"training failed (exit code {proc.returncode}); its message is above")
    return time.time() - train_start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="demo_out")
    parser.add_argument("--steps", type=int, default=150, help="LoRA training steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lora", help="compare with this LoRA (from an earlier run with the same "
                                       "--out) instead of training one")
    args = parser.parse_args()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    started = time.time()

    ckpt = os.path.join(out, "tiny_sdxl.safetensors")
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_tiny_sdxl.py"), "--out",
                    ckpt, "--seed", "0", "--calibrate_vae"], check=True)
    images, toml = make_dataset(os.path.join(out, "data"))
    lora = args.lora or os.path.join(out, "shapes_lora.safetensors")
    train_seconds = 0.0 if args.lora else train(args, ckpt, toml, out)

    from PIL import Image
    from mindspore import Tensor
    from library.generation.pipeline import Pipeline
    from library.generation.requests import GenerationOptions, ImageRequest
    from library.models import load_sdxl
    from networks import lora as lora_lib

    models = load_sdxl(ckpt)
    scale = models.config.vae.scaling_factor
    targets = []
    for i in range(len(SHAPES)):
        pixels = np.asarray(Image.open(os.path.join(images, f"{i}.png")), np.float32) / 127.5 - 1
        moments = models.vae.encode(Tensor(pixels.transpose(2, 0, 1)[None])).asnumpy()[0]
        targets.append(moments[:4] * scale)     # the mean latent the LoRA was trained towards
    te = [models.text_encoder1, models.text_encoder2]
    network, weights = lora_lib.create_network_from_weights(1.0, lora, models.vae, te, models.unet)
    network.apply_to(te, models.unet)
    network.load_state_dict(weights, source=lora)

    pipe = Pipeline(models, GenerationOptions())
    rows = []
    distances = {k: [] for k in ("denoise_base", "denoise_lora", "sample_base", "sample_lora")}
    rng = np.random.default_rng(args.seed)
    for i, (caption, _, _) in enumerate(SHAPES):
        noise = rng.standard_normal(targets[i].shape).astype(np.float32)
        row = [Image.open(os.path.join(images, f"{i}.png")).convert("RGB")]
        lo, hi = np.percentile(targets[i][:3], 1), np.percentile(targets[i][:3], 99)
        row.append(latent_preview(targets[i], lo, hi))
        noisy = None
        for name, multiplier in (("base", 0.0), ("lora", 1.0)):
            network.set_multiplier(multiplier)
            noisy, denoised = denoise_once(models, caption, targets[i], noise, DENOISE_T)
            distances[f"denoise_{name}"].append(float(np.mean((denoised - targets[i]) ** 2)))
            row.append(latent_preview(denoised, lo, hi))
            request = ImageRequest(caption, seed=100 + i, width=SIZE, height=SIZE, steps=24,
                                   scale=1.0, sampler="euler")
            sample = pipe.generate([request])[0]
            distances[f"sample_{name}"].append(float(np.mean((sample.latents - targets[i]) ** 2)))
            row.append(latent_preview(sample.latents, lo, hi))
        row.insert(2, latent_preview(noisy, lo, hi))
        rows.append(row)

    titles = ["training image", "its latent", f"noised, t={DENOISE_T}", "base denoises",
              "base sample", "LoRA denoises", "LoRA sample"]
    grid = Image.new("RGB", (SIZE * len(titles), SIZE * len(rows)), "white")
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            grid.paste(label(img.copy(), titles[c]) if r == 0 else img, (c * SIZE, r * SIZE))
    grid_path = os.path.join(out, "demo_grid.png")
    grid.save(grid_path)

    mean = {k: float(np.mean(v)) for k, v in distances.items()}
    base, tuned = mean["denoise_base"], mean["denoise_lora"]
    summary = {"train_steps": args.steps, "train_seconds": round(train_seconds, 1),
               **{f"latent_mse_{k}": round(v, 4) for k, v in mean.items()},
               "denoise_closer_factor": round(base / tuned, 2),
               "sample_closer_factor": round(mean["sample_base"] / mean["sample_lora"], 2),
               "generation": pipe.stats.summary(), "total_seconds": round(time.time() - started, 1)}
    with open(os.path.join(out, "demo_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"\nLoRA:        {lora}\nloss curve:  {os.path.join(out, 'shapes_lora_loss.png')}\n"
          f"grid:        {grid_path}\n"
          f"The grid has one row per training caption, as latent previews: the training image "
          f"and its latent, that latent noised to t={DENOISE_T}, then for the base model (LoRA "
          f"multiplier 0) and with the LoRA (multiplier 1) its one-step denoising of the noised "
          f"latent and a 24-step euler sample of the caption.\n"
          f"Mean squared distance to the training latents: denoised, base {base:.4f} vs LoRA "
          f"{tuned:.4f} ({base / tuned:.1f}x closer); sampled, base {mean['sample_base']:.2f} "
          f"vs LoRA {mean['sample_lora']:.2f} ({mean['sample_base'] / mean['sample_lora']:.1f}x "
          f"closer).\nTraining took {train_seconds:.0f} s; generation: {pipe.stats.summary()}.")


if __name__ == "__main__":
    exit_on_user_error(main)
