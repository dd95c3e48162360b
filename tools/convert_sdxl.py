"""Convert SDXL weights between a single .safetensors file and a diffusers-format folder.

    python tools/convert_sdxl.py SRC --out DST [--to single|diffusers] [--dtype float16]

SRC is anything `load_sdxl` takes (single file, diffusers folder, hub id). The load is strict, so
this is also the quickest way to check that a checkpoint is a complete, uncorrupted SDXL model.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.errors import UserError, exit_on_user_error  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="SDXL .safetensors file, diffusers folder or hub id")
    parser.add_argument("--out", required=True, help="output file (.safetensors) or folder")
    parser.add_argument("--to", choices=("single", "diffusers"),
                        help="output format (default: single for a .safetensors --out, else "
                             "diffusers)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                        help="dtype of the written weights (default: as loaded, float32)")
    args = parser.parse_args()
    to = args.to or ("single" if args.out.endswith(".safetensors") else "diffusers")
    if to == "single" and not args.out.endswith(".safetensors"):
        raise UserError(f"--out {args.out}: a single-file checkpoint must end in .safetensors")

    from library.models import load_sdxl
    from library.models.checkpoint import save_diffusers_folder, save_single_file

    start = time.time()
    models = load_sdxl(args.src)
    print(f"loaded {args.src} (preset {models.config.name}) in {time.time() - start:.1f} s")
    if to == "single":
        save_single_file(models, args.out, dtype=args.dtype)
    else:
        save_diffusers_folder(models, args.out, dtype=args.dtype)
    print(f"wrote {args.out} ({to})")


if __name__ == "__main__":
    exit_on_user_error(main)
