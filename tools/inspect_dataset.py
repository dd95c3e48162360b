"""Show what a dataset config builds, without any model: buckets, repeats, regularisation
balancing, and per image its bucket, resize, SDXL size conditioning and one processed caption.

    python tools/inspect_dataset.py --dataset_config my_data.toml [--json]
    python tools/inspect_dataset.py --train_data_dir img --reg_data_dir reg --resolution 1024 --enable_bucket

Takes every dataset option the trainer takes (kohya's names). Bad input exits with code 2 and
one message. The caption shown is one draw (epoch 1, step 0) of the per-sample processing.
"""

import argparse
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.data.captions import process_caption  # noqa: E402
from library.data.config import add_dataset_arguments, resolve_dataset_configs  # noqa: E402
from library.data.dataset import build_dataset_groups  # noqa: E402
from library.data.examples import conditioning  # noqa: E402
from library.errors import exit_on_user_error  # noqa: E402


def describe(group, seed):
    """The dataset group as one JSON-ready dict."""
    out = {"bucket_shapes_wh": [list(s) for s in group.bucket_shapes()], "num_batches": group.num_batches(),
           "num_samples_per_epoch": group.num_samples(), "latents_cacheable": group.is_latent_cacheable(),
           "text_encoder_outputs_cacheable": group.is_text_encoder_output_cacheable(), "datasets": [], "images": []}
    for di, ds in enumerate(group.datasets):
        c = ds.config
        per_subset = {}
        for r in ds.records:
            per_subset[id(r.subset)] = per_subset.get(id(r.subset), 0) + 1
        out["datasets"].append({
            "method": "dreambooth" if c.is_dreambooth else "finetuning",
            "resolution_wh": list(c.resolution), "batch_size": c.batch_size, "enable_bucket": c.enable_bucket,
            "bucket_no_upscale": c.bucket_no_upscale, "bucket_reso_steps": c.bucket_reso_steps,
            "true_crop_top_left": c.true_crop_top_left,
            "buckets": [{"bucket_wh": list(shape), "count": len(items)} for shape, items in sorted(ds.buckets.items())],
            "mean_ar_error": ds.mean_ar_error(),
            "num_train_images_with_repeats": ds.num_train_images,
            "num_reg_images_with_repeats_before_balancing": ds.num_reg_images,
            "num_reg_samples_after_balancing": sum(r.num_repeats for r in ds.records if r.is_reg),
            "unused_reg_images": ds.unused_reg_images,
            "skipped_corrupt_images": ds.skipped_corrupt,
            "num_batches": ds.num_batches(),
            "subsets": [{"image_dir": s.image_dir, "metadata_file": s.metadata_file, "is_reg": s.is_reg,
                         "num_repeats": s.num_repeats, "images_used": per_subset.get(id(s), 0),
                         "class_tokens": s.class_tokens, "caption_extension": s.caption_extension}
                        for s in c.subsets],
        })
        for i, r in enumerate(ds.records):
            orig_hw, crop_tl, target_hw = conditioning(r, c)
            rng = random.Random(f"inspect:{seed}:{di}:{i}")
            out["images"].append({
                "dataset": di, "path": r.path, "is_reg": r.is_reg, "num_repeats": r.num_repeats,
                "bucket_wh": list(r.bucket.bucket_wh), "resized_wh": list(r.bucket.resized_wh),
                "original_size_hw": list(orig_hw), "crop_top_left": list(crop_tl), "target_size_hw": list(target_hw),
                "caption": process_caption(r.caption, r.subset.caption, rng), "mask": r.mask_path,
            })
    return out


def print_text(doc):
    print(f"bucket shapes (w, h): {', '.join(f'{w}x{h}' for w, h in doc['bucket_shapes_wh'])}")
    print(f"{doc['num_samples_per_epoch']} samples per epoch in {doc['num_batches']} batches; "
          f"latents cacheable: {doc['latents_cacheable']}; "
          f"text-encoder outputs cacheable: {doc['text_encoder_outputs_cacheable']}")
    for di, ds in enumerate(doc["datasets"]):
        print(f"\n[dataset {di}] {ds['method']}, resolution {ds['resolution_wh'][0]}x{ds['resolution_wh'][1]}, "
              f"batch_size {ds['batch_size']}, enable_bucket {ds['enable_bucket']}, "
              f"bucket_no_upscale {ds['bucket_no_upscale']}, steps {ds['bucket_reso_steps']}")
        for s in ds["subsets"]:
            kind = "reg  " if s["is_reg"] else "train"
            print(f"  {kind} {s['image_dir'] or s['metadata_file']}: {s['images_used']} images x {s['num_repeats']} repeats")
        print(f"  training images with repeats: {ds['num_train_images_with_repeats']}")
        if ds["num_reg_images_with_repeats_before_balancing"]:
            print(f"  reg images with repeats: {ds['num_reg_images_with_repeats_before_balancing']} before balancing, "
                  f"{ds['num_reg_samples_after_balancing']} samples per epoch after; "
                  f"{ds['unused_reg_images']} reg images unused (first-N rule)")
        if ds["skipped_corrupt_images"]:
            print(f"  skipped {len(ds['skipped_corrupt_images'])} unreadable images: "
                  f"{', '.join(ds['skipped_corrupt_images'])}")
        print(f"  mean aspect-ratio error: {ds['mean_ar_error']:.4f}")
        for b in ds["buckets"]:
            print(f"  bucket {b['bucket_wh'][0]:>5}x{b['bucket_wh'][1]:<5} {b['count']:>6} samples")
    print("\npath | bucket wxh | resized wxh | original_size hw | crop_top_left | target_size hw | repeats | caption")
    for im in doc["images"]:
        print(f"{im['path']} | {im['bucket_wh'][0]}x{im['bucket_wh'][1]} | {im['resized_wh'][0]}x{im['resized_wh'][1]} | "
              f"{tuple(im['original_size_hw'])} | {tuple(im['crop_top_left'])} | {tuple(im['target_size_hw'])} | "
              f"{im['num_repeats']}{' reg' if im['is_reg'] else ''} | {im['caption']}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_dataset_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed for the validation split and the caption shown")
    parser.add_argument("--masked_loss", action="store_true",
                        help="as the trainer's: allows mask-image subsets (conditioning_data_dir)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    args = parser.parse_args()
    train, _ = build_dataset_groups(resolve_dataset_configs(args), seed=args.seed)
    doc = describe(train, args.seed)
    if args.json:
        json.dump(doc, sys.stdout, indent=1, ensure_ascii=False)
        print()
    else:
        print_text(doc)


if __name__ == "__main__":
    exit_on_user_error(main)
