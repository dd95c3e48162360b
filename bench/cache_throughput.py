"""Benchmark: latent caching with the tiny VAE (images per second), as a table.

    python bench/cache_throughput.py [--images 64] [--size 256] [--vae_batch_size 1 4]

Generates PNG images of `size` x `size` (a bucket size, so only decode + VAE are timed),
builds the tiny SDXL model (tools/make_tiny_sdxl.py --seed 0), and for each VAE batch size
times: caching in RAM (--cache_latents), a first --cache_latents_to_disk run (encode + write)
and a second one (every entry a hit: hash the image, open the npz, compare the key).
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--vae_batch_size", type=int, nargs="+", default=[1, 4])
    opts = parser.parse_args()

    import numpy as np
    from PIL import Image

    from library.training import cache_encoders as caching
    from library.data.captions import CaptionOptions
    from library.data.config_schema import DatasetConfig, SubsetConfig
    from library.data.dataset import build_dataset_groups
    from library.models import load_sdxl

    work = tempfile.mkdtemp(prefix="cache_bench_")
    ckpt = os.path.join(work, "tiny.safetensors")
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_tiny_sdxl.py"), "--out", ckpt, "--seed", "0"],
                   check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=ROOT))
    models = load_sdxl(ckpt)
    rng = np.random.default_rng(0)
    rows = []
    for bs in opts.vae_batch_size:
        folder = os.path.join(work, f"img_bs{bs}")
        os.makedirs(folder)
        for i in range(opts.images):
            Image.fromarray(rng.integers(0, 256, (opts.size, opts.size, 3), dtype=np.uint8)).save(
                os.path.join(folder, f"{i:04d}.png"))
        sub = SubsetConfig(image_dir=folder, class_tokens="x", where="bench", caption=CaptionOptions())
        cfg = DatasetConfig(subsets=(sub,), is_dreambooth=True, resolution=(opts.size, opts.size), enable_bucket=True,
                            min_bucket_reso=64, max_bucket_reso=2 * opts.size, bucket_reso_steps=32, where="bench")
        group, _ = build_dataset_groups([cfg])
        caching.latent_encoder(models.vae)(np.zeros((bs, opts.size, opts.size, 3), np.uint8), [0] * bs)   # warm-up
        for label, argv in (("RAM", dict(cache_latents=True, cache_latents_to_disk=False)),
                            ("disk, first run", dict(cache_latents=True, cache_latents_to_disk=True)),
                            ("disk, rerun (hits)", dict(cache_latents=True, cache_latents_to_disk=True))):
            args = argparse.Namespace(vae_batch_size=bs, skip_cache_check=False, **argv)
            t = time.perf_counter()
            cache = caching.cache_latents(group, models, args, progress=False)
            dt = time.perf_counter() - t
            rows.append((bs, label, cache.computed, cache.hits, opts.images / dt, dt))
    print(f"\n{opts.images} images of {opts.size}x{opts.size} px, tiny VAE, PyNative CPU, {os.cpu_count()} cores\n")
    print("| vae_batch_size | mode | computed | hits | images/s | seconds |")
    print("|---:|---|---:|---:|---:|---:|")
    for bs, label, comp, hits, ips, dt in rows:
        print(f"| {bs} | {label} | {comp} | {hits} | {ips:.1f} | {dt:.2f} |")


if __name__ == "__main__":
    main()
