"""Check a LoRA file against the SDXL module tree: what it holds and whether every key fits.

    python tools/check_lora.py my_lora.safetensors                      # against SDXL base
    python tools/check_lora.py my_lora.safetensors --model sd_xl_base_1.0.safetensors
    python tools/check_lora.py my_lora.safetensors --preset tiny --json

Lists every module (kind, rank, alpha) and the metadata, then the counts of matched and
unmatched modules. No weights are read from the model: the module tree is built without
initialisation (about a second for full-size SDXL), and --model only tells which preset.

Exit codes: 0 every key fits; 2 with one `error:` line when a key does not fit, a shape is
wrong, the file is for another model family, or the file cannot be read.
"""

import argparse
import json
import os
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.errors import UserError, exit_on_user_error  # noqa: E402


def preset_of_checkpoint(path):
    """The model preset of a single-file SDXL checkpoint, from its tensor shapes only."""
    from library import file_checks
    from library.models import checkpoint, keymaps
    from library.safetensors_io import SafetensorsFile
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder: --model takes a single-file SDXL checkpoint; for a "
                        "diffusers folder pass --preset instead")
    file_checks.refuse_pickle(path)
    st = SafetensorsFile(path)
    keys = set(st.keys())
    checkpoint._check_is_sdxl(path, keys)
    prefix = keymaps.SINGLE_FILE_PREFIXES["unet"]
    return checkpoint.detect_preset(path, lambda k: st.shape(prefix + k)
                                    if prefix + k in keys else None)


def check(path, preset):
    from library.models import build_sdxl
    from library.safetensors_io import SafetensorsFile
    from networks import lora
    models = build_sdxl(preset, init=False)
    weights, metadata = lora.load_lora_file(path, unet_config=models.config.unet)
    st = SafetensorsFile(path)
    targets = lora.model_targets([models.text_encoder1, models.text_encoder2], models.unet)
    report = lora.match_report(weights, targets)
    modules = report["modules"]
    by_side = Counter(name.split("_")[1] for name in modules)
    doc = {
        "file": str(path), "preset": preset, "tensors": len(weights),
        "dtypes": dict(Counter(st.dtype(k) for k in st.keys())),
        "modules": {n: {**m, "matched": n in report["matched"]}
                    for n, m in sorted(modules.items())},
        "counts": {"modules_in_file": len(modules), "te1": by_side.get("te1", 0),
                   "te2": by_side.get("te2", 0), "unet": by_side.get("unet", 0),
                   "matched": len(report["matched"]),
                   "unmatched_modules": len(modules) - len(report["matched"]),
                   "unmatched_keys": len(report["unmatched_keys"]),
                   "model_modules_not_in_file": len(report["missing_modules"])},
        "ranks": dict(sorted(Counter(str(m["rank"]) for m in modules.values()).items())),
        "alphas": dict(sorted(Counter(str(m["alpha"]) for m in modules.values()).items())),
        "unmatched_keys": report["unmatched_keys"], "problems": report["problems"],
        "hint": report["hint"], "metadata": metadata,
    }
    return doc, report


def print_text(doc):
    print(f"file: {doc['file']}  ({doc['tensors']} tensors; dtypes "
          f"{', '.join(f'{k} x{v}' for k, v in doc['dtypes'].items())})")
    print(f"model: preset {doc['preset']}")
    print("modules:")
    for name, m in doc["modules"].items():
        mark = "" if m["matched"] else "   <- does not fit"
        print(f"  {name}  {m['kind'] or '?'}  rank {m['rank']}  alpha {m['alpha']}{mark}")
    print(f"ranks: {doc['ranks']}  alphas: {doc['alphas']}")
    if doc["metadata"]:
        print("metadata:")
        for k in sorted(doc["metadata"]):
            v = doc["metadata"][k]
            print(f"  {k}: {v if len(v) <= 200 else v[:200] + f'... ({len(v)} chars)'}")
    for k in doc["unmatched_keys"][:50]:
        print(f"unmatched key: {k}")
    for p in doc["problems"][:50]:
        print(f"problem: {p}")
    c = doc["counts"]
    print(f"modules in file: {c['modules_in_file']} (te1 {c['te1']}, te2 {c['te2']}, "
          f"unet {c['unet']}); model modules not in file: {c['model_modules_not_in_file']}")
    print(f"matched: {c['matched']}  unmatched modules: {c['unmatched_modules']}  "
          f"unmatched keys: {c['unmatched_keys']}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("file", help="LoRA .safetensors (kohya, diffusers/PEFT or ours)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--model", help="SDXL single-file checkpoint to check against (its "
                       "shapes choose the preset; no weights are loaded)")
    group.add_argument("--preset", choices=["sdxl_base", "tiny"], default=None,
                       help="model preset to check against (default sdxl_base)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)

    def run():
        from networks import lora
        preset = preset_of_checkpoint(args.model) if args.model else (args.preset or "sdxl_base")
        doc, report = check(args.file, preset)
        if args.json:
            print(json.dumps(doc, indent=1))
        else:
            print_text(doc)
        sys.stdout.flush()
        lora.raise_if_bad(report, args.file)
        if not report["matched"]:
            raise UserError(f"{args.file} holds no LoRA modules")
        return 0

    return exit_on_user_error(run)


if __name__ == "__main__":
    sys.exit(main())
