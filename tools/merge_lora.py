"""Merge SDXL LoRAs: into a checkpoint, or several into one LoRA (kohya's sdxl_merge_lora.py).

Into a checkpoint (W += ratio · alpha/rank · up@down, computed in float32):
    python tools/merge_lora.py --sd_model sd_xl_base_1.0.safetensors --models a.safetensors \
        b.safetensors --ratios 0.8 0.5 --save_to merged.safetensors [--save_precision fp16]

Several LoRAs into one:
    python tools/merge_lora.py --models a.safetensors b.safetensors --ratios 1 0.5 \
        --save_to ab.safetensors --concat            # exact: ranks add up
    ... --new_rank 16 [--new_conv_rank 8]            # exact sum of ΔW, SVD-truncated to rank
    ... (neither)                                    # kohya's default: sums the up and down
                                                     # factors separately (an approximation)

Every LoRA is checked strictly against the SDXL module tree first; a key that fits nothing is
an error (exit code 2, one `error:` line).
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.errors import UserError, exit_on_user_error  # noqa: E402


def _read(path, unet_config=None):
    from networks import lora
    return lora.load_lora_file(path, unet_config=unet_config)


def module_factors(weights):
    """{module: (down, up, alpha, rank)} in float32."""
    from networks import lora
    out = {}
    for name, e in lora.split_modules(weights).items():
        if "lora_down" not in e or "lora_up" not in e:
            raise UserError(f"LoRA module {name} lacks lora_down or lora_up")
        down = np.asarray(e["lora_down"], np.float32)
        up = np.asarray(e["lora_up"], np.float32)
        rank = down.shape[0]
        alpha = float(np.asarray(e["alpha"], np.float64)) if "alpha" in e else float(rank)
        out[name] = (down, up, alpha, rank)
    return out


def merge_kohya_sum(loaded, ratios):
    """kohya's default LoRA+LoRA merge: down += down_i·s_i, up += up_i·|s_i| with
    s_i = sqrt(alpha_i / base_alpha)·ratio_i; the first model's alpha is kept. Not the sum of
    the ΔW (cross terms), kept for compatibility."""
    merged, base_alpha = {}, {}
    for factors, ratio in zip(loaded, ratios):
        for name, (down, up, alpha, _) in factors.items():
            base_alpha.setdefault(name, alpha)
            s = float(np.sqrt(alpha / base_alpha[name]) * ratio)
            for part, arr, scale in (("lora_down", down, s), ("lora_up", up, abs(s))):
                key = f"{name}.{part}.weight"
                if key in merged:
                    if merged[key].shape != arr.shape:
                        raise UserError(f"{key}: ranks differ between the LoRAs "
                                        f"({merged[key].shape} vs {arr.shape}); use --concat "
                                        "or --new_rank")
                    merged[key] = merged[key] + arr * scale
                else:
                    merged[key] = arr * scale
    for name, alpha in base_alpha.items():
        merged[f"{name}.alpha"] = np.array(alpha, np.float32)
    return merged


def merge_concat(loaded, ratios):
    """Exact: up = [up_i·ratio_i·alpha_i/r_i ...], down = [down_i ...], alpha = Σ r_i (scale 1),
    so ΔW = Σ ratio_i·(alpha_i/r_i)·up_i@down_i."""
    ups, downs = {}, {}
    for factors, ratio in zip(loaded, ratios):
        for name, (down, up, alpha, rank) in factors.items():
            ups.setdefault(name, []).append(up * np.float32(ratio * alpha / rank))
            downs.setdefault(name, []).append(down)
    merged = {}
    for name in ups:
        down = np.concatenate(downs[name], axis=0)
        merged[f"{name}.lora_down.weight"] = down
        merged[f"{name}.lora_up.weight"] = np.concatenate(ups[name], axis=1)
        merged[f"{name}.alpha"] = np.array(down.shape[0], np.float32)
    return merged


def merge_svd(loaded, ratios, new_rank, new_conv_rank=None):
    """The exact sum of the ΔW, truncated by SVD to `new_rank` (3×3 convs: `new_conv_rank`).
    Done on the concatenated factors (QR, then an SVD of the small core), so full-size SDXL
    merges in seconds; alpha = rank (scale 1)."""
    concat = merge_concat(loaded, ratios)
    from networks.lora import split_modules
    merged = {}
    for name, e in split_modules(concat).items():
        down, up = e["lora_down"], e["lora_up"]
        is_conv3 = down.ndim == 4 and down.shape[2:] != (1, 1)
        target = (new_conv_rank or new_rank) if is_conv3 else new_rank
        d2 = down.reshape(down.shape[0], -1)             # [R, in·k·k]
        u2 = up.reshape(up.shape[0], -1)                 # [out, R]
        qu, ru = np.linalg.qr(u2.astype(np.float64))
        qd, rd = np.linalg.qr(d2.T.astype(np.float64))
        U, S, Vh = np.linalg.svd(ru @ rd.T)
        r = int(min(target, S.shape[0]))
        new_up = (qu @ U[:, :r]) * S[:r]
        new_down = Vh[:r] @ qd.T
        merged[f"{name}.lora_up.weight"] = new_up.astype(np.float32).reshape(
            (up.shape[0], r) + up.shape[2:])
        merged[f"{name}.lora_down.weight"] = new_down.astype(np.float32).reshape(
            (r,) + down.shape[1:])
        merged[f"{name}.alpha"] = np.array(r, np.float32)
    return merged


def _metadata_of(path):
    from library.safetensors_io import SafetensorsFile
    return SafetensorsFile(path).metadata


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sd_model", help="SDXL single-file checkpoint to merge into; omitted: "
                        "merge the LoRAs into one LoRA")
    parser.add_argument("--save_to", required=True, help="output .safetensors")
    parser.add_argument("--models", nargs="+", required=True, help="LoRA files")
    parser.add_argument("--ratios", type=float, nargs="*", help="one per model (default 1.0)")
    parser.add_argument("--save_precision", choices=["float", "fp16", "bf16"], default=None,
                        help="output precision (default: float for LoRAs; the checkpoint's own "
                             "for a model)")
    parser.add_argument("--precision", choices=["float"], default="float",
                        help="merge arithmetic (always float32 here)")
    parser.add_argument("--concat", action="store_true",
                        help="LoRA+LoRA: concatenate the ranks (exact)")
    parser.add_argument("--new_rank", type=int, default=None,
                        help="LoRA+LoRA: exact sum reduced to this rank by SVD")
    parser.add_argument("--new_conv_rank", type=int, default=None,
                        help="rank for 3x3 convs with --new_rank (default: --new_rank)")
    parser.add_argument("--shuffle", action="store_true", help="permute each merged rank "
                        "(kohya's option; the LoRA's effect is unchanged)")
    parser.add_argument("--no_metadata", action="store_true",
                        help="no modelspec metadata (the minimum ss_* keys are kept)")
    args = parser.parse_args(argv)

    def run():
        from library.arg_checks import MERGE_RANGES, check_numbers
        check_numbers(args, MERGE_RANGES)
        folder = os.path.dirname(os.path.abspath(args.save_to))
        if not os.path.isdir(folder):
            raise UserError(f"--save_to {args.save_to}: the folder {folder} does not exist")
        if os.path.isdir(args.save_to) or not args.save_to.endswith(".safetensors"):
            # kohya picks the format by the suffix (anything else is a pickle): say so first
            raise UserError(f"--save_to {args.save_to}: give a file name ending in .safetensors")
        return merge(args)

    return exit_on_user_error(run)


def merge(args):
    from library import lora_metadata as md
    from library.models import build_sdxl, load_sdxl
    from library.models.checkpoint import save_single_file
    from networks import lora

    ratios = args.ratios if args.ratios else [1.0] * len(args.models)
    if len(ratios) != len(args.models):
        raise UserError(f"--ratios has {len(ratios)} values for {len(args.models)} models")
    if args.concat and args.new_rank:
        raise UserError("--concat and --new_rank are two different merges: choose one")
    if args.new_conv_rank and not args.new_rank:
        raise UserError("--new_conv_rank needs --new_rank")
    timestamp = time.time()
    title = os.path.splitext(os.path.basename(args.save_to))[0]
    merged_from = md.merged_from(args.models, _metadata_of)

    if args.sd_model:
        if args.concat or args.new_rank or args.shuffle:
            raise UserError("--concat/--new_rank/--shuffle are for LoRA+LoRA merges, "
                            "not --sd_model")
        models = load_sdxl(args.sd_model, "float32")
        unet_cfg = models.config.unet
        weights = [_read(p, unet_cfg)[0] for p in args.models]
        targets = lora.model_targets([models.text_encoder1, models.text_encoder2], models.unet)
        for path, w in zip(args.models, weights):
            lora.raise_if_bad(lora.match_report(w, targets), path)
        for path, w, ratio in zip(args.models, weights, ratios):
            net, sd = lora.create_network_from_weights(
                ratio, None, None, [models.text_encoder1, models.text_encoder2], models.unet,
                weights_sd=w)
            net.merge_to(weights_sd=sd, multiplier=ratio)
            print(f"merged {path} x {ratio} ({len(net)} modules)")
        metadata = {} if args.no_metadata else md.modelspec_metadata(
            title=title, timestamp=timestamp, lora=False, merged_from=merged_from)
        save_dtype = lora.SAVE_DTYPES[args.save_precision] if args.save_precision else None
        if save_dtype is None:
            from library.safetensors_io import SafetensorsFile
            st = SafetensorsFile(args.sd_model)
            codes = {st.dtype(k) for k in st.keys() if k.startswith("model.diffusion_model.")}
            save_dtype = {"F16": "float16", "BF16": "bfloat16"}.get(codes.pop(), "float32") \
                if len(codes) == 1 else "float32"
        save_single_file(models, args.save_to, dtype=save_dtype, metadata=metadata or None)
        print(f"saved {args.save_to}")
        return 0

    # LoRA + LoRA: check each against the SDXL module tree of its preset (shapes decide).
    loaded, versions = [], []
    for path in args.models:
        weights, meta = _read(path)
        preset = "sdxl_base"
        report = None
        for candidate in ("sdxl_base", "tiny"):
            m = build_sdxl(candidate, init=False)
            t = lora.model_targets([m.text_encoder1, m.text_encoder2], m.unet)
            rep = lora.match_report(weights, t)
            if report is None or len(rep["matched"]) > len(report["matched"]):
                preset, report = candidate, rep
        lora.raise_if_bad(report, path)
        versions.append(preset)
        loaded.append(module_factors(weights))
    if len(set(versions)) > 1:
        raise UserError(f"the LoRAs are for different models: {dict(zip(args.models, versions))}")
    if args.new_rank:
        merged = merge_svd(loaded, ratios, args.new_rank, args.new_conv_rank)
    elif args.concat:
        merged = merge_concat(loaded, ratios)
    else:
        merged = merge_kohya_sum(loaded, ratios)
    if args.shuffle:
        rng = np.random.default_rng()
        for name, e in lora.split_modules(merged).items():
            perm = rng.permutation(e["lora_down"].shape[0])
            merged[f"{name}.lora_down.weight"] = e["lora_down"][perm]
            merged[f"{name}.lora_up.weight"] = e["lora_up"][:, perm]
    modules = lora.split_modules(merged)
    dims = {int(e["lora_down"].shape[0]) for e in modules.values()}
    alphas = {float(e["alpha"]) for e in modules.values()}
    metadata = md.build_minimum_network_metadata(
        "False", md.SDXL_BASE_MODEL_VERSION, "networks.lora",
        str(dims.pop()) if len(dims) == 1 else "Dynamic",
        str(alphas.pop()) if len(alphas) == 1 else "Dynamic")
    if not args.no_metadata:
        metadata.update(md.modelspec_metadata(title=title, timestamp=timestamp, lora=True,
                                              merged_from=merged_from))
    lora.save_lora_file(args.save_to, merged, args.save_precision or "float", metadata)
    print(f"saved {args.save_to} ({len(modules)} modules)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
