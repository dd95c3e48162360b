"""Images per second through decode + bucket resize/crop + caption processing, in-process and
with worker processes. Prints a markdown table. Not a test.

    python bench/dataset_throughput.py [--images 1000] [--workers 0 2] [--cache_dir DIR]

The images (JPEG, about 1024 px, four aspect ratios, none already a bucket size so every one is
resized) are generated once into --cache_dir and reused.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from library.data.captions import CaptionOptions  # noqa: E402
from library.data.config_schema import DatasetConfig, SubsetConfig  # noqa: E402
from library.data.dataset import build_dataset_groups  # noqa: E402
from library.data.loader import BatchLoader  # noqa: E402

SIZES = [(1100, 1100), (1300, 900), (900, 1300), (1500, 850)]


def make_images(folder, count):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        path = os.path.join(folder, f"{i:05d}.jpg")
        if os.path.exists(path):
            continue
        w, h = SIZES[i % len(SIZES)]
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (w + h) + i % 128], -1)
        noise = rng.integers(0, 24, (h, w, 3))
        Image.fromarray((base + noise).clip(0, 255).astype(np.uint8)).save(path, quality=90)
        with open(os.path.join(folder, f"{i:05d}.txt"), "w") as f:
            f.write("sks, a photo, red, green, blue, outdoors, daylight, high quality")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--cache_dir", default=os.path.join(os.path.expanduser("~"), ".cache", "sdxl_lora_bench_images"))
    args = parser.parse_args()

    folder = os.path.join(args.cache_dir, f"n{args.images}")
    t0 = time.perf_counter()
    make_images(folder, args.images)
    print(f"images ready in {time.perf_counter() - t0:.1f} s: {folder}", file=sys.stderr)

    subset = SubsetConfig(image_dir=folder, caption_extension=".txt", where="bench",
                          caption=CaptionOptions(shuffle_caption=True, keep_tokens=1, caption_tag_dropout_rate=0.1))
    config = DatasetConfig(subsets=(subset,), is_dreambooth=True, resolution=(1024, 1024), batch_size=args.batch_size,
                           enable_bucket=True, max_bucket_reso=2048, where="bench")
    t0 = time.perf_counter()
    group, _ = build_dataset_groups([config])
    build = time.perf_counter() - t0

    print(f"{args.images} images, {os.cpu_count()} CPUs, batch size {args.batch_size}, "
          f"buckets {group.bucket_shapes()}; building the dataset (headers, captions, buckets) took {build:.2f} s\n")
    print("| workers | images/s | seconds |")
    print("|---:|---:|---:|")
    for workers in args.workers:
        loader = BatchLoader(group, seed=0, num_workers=workers)
        t0 = time.perf_counter()
        n = sum(len(batch) for batch in loader.epoch(1))
        dt = time.perf_counter() - t0
        print(f"| {workers} | {n / dt:.1f} | {dt:.1f} |")


if __name__ == "__main__":
    main()
