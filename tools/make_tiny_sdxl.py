"""Write a tiny SDXL single-file checkpoint in the real key format, with seeded random weights.

    python tools/make_tiny_sdxl.py --out tiny.safetensors [--seed 0] [--preset tiny]

It is the embedded default model of the demo and the tests: same topology and key names as
SDXL base (model.diffusion_model.*, conditioner.embedders.{0,1}.*, first_stage_model.*), small
enough for CPU. The same seed gives the same bytes on any machine (numpy's PCG64 stream).
Weights are scaled so activations stay near unit size through every block, which makes parity
tests against the PyTorch reference meaningful (nothing vanishes or saturates).
"""

import argparse
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.errors import exit_on_user_error  # noqa: E402


def random_tensor(rng, key, shape):
    name = key.rsplit(".", 1)[-1]
    if key.endswith("logit_scale"):
        return np.array(math.log(100.0), dtype=np.float32)
    if "embedding" in key:
        return (0.1 * rng.standard_normal(shape)).astype(np.float32)
    if len(shape) == 1:
        values = 0.1 * rng.standard_normal(shape)
        return (values + 1.0 if name == "weight" else values).astype(np.float32)  # norm scales
    fan_in = shape[0] if key.endswith("text_projection") else int(np.prod(shape[1:]))
    return (rng.standard_normal(shape) / math.sqrt(fan_in)).astype(np.float32)


def calibrate_vae(path, tensors):
    """Rescale quant_conv's mean rows (and post_quant_conv's inputs, so decoding sees the same
    values) so that scaled latents of smooth random pictures have standard deviation 1.
    Returns the factor applied."""
    from mindspore import Tensor
    from library.models import load_sdxl
    models = load_sdxl(path)
    rng = np.random.default_rng(0)
    coarse = rng.uniform(-1, 1, size=(4, 3, 8, 8)).astype(np.float32)
    pictures = np.repeat(np.repeat(coarse, 16, axis=2), 16, axis=3)     # flat colour patches
    moments = models.vae.encode(Tensor(pictures)).asnumpy()
    latent_std = float((moments[:, :4] * models.config.vae.scaling_factor).std())
    factor = 1.0 / latent_std
    c = models.config.vae.latent_channels
    for suffix in ("weight", "bias"):
        tensors[f"first_stage_model.quant_conv.{suffix}"][:c] *= factor
    tensors["first_stage_model.post_quant_conv.weight"][:, :c] /= factor
    return factor


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output .safetensors path")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default="tiny", help="model preset (default: tiny)")
    parser.add_argument("--calibrate_vae", action="store_true",
                        help="scale the VAE's latent mean channels so that scaled latents of "
                             "simple pictures have unit variance, as SDXL's scaling factor is "
                             "chosen to give; the demo trains on such a model")
    args = parser.parse_args()

    from library.models import build_sdxl
    from library.models.checkpoint import checkpoint_shapes
    from library.safetensors_io import write_safetensors

    shapes = checkpoint_shapes(build_sdxl(args.preset, init=False))
    rng = np.random.default_rng(args.seed)
    tensors = {key: random_tensor(rng, key, shapes[key]) for key in sorted(shapes)}
    write_safetensors(args.out, tensors, metadata={"modelspec.architecture":
                                                   "stable-diffusion-xl-v1-base",
                                                   "tiny_sdxl.seed": str(args.seed),
                                                   "tiny_sdxl.preset": args.preset})
    if args.calibrate_vae:
        factor = calibrate_vae(args.out, tensors)
        write_safetensors(args.out, tensors, metadata={"modelspec.architecture":
                                                       "stable-diffusion-xl-v1-base",
                                                       "tiny_sdxl.seed": str(args.seed),
                                                       "tiny_sdxl.preset": args.preset,
                                                       "tiny_sdxl.vae_calibration": f"{factor:.6g}"})
    n = sum(int(np.prod(s)) for s in shapes.values())
    print(f"wrote {args.out}: {len(tensors)} tensors, {n:,} parameters (preset {args.preset}, "
          f"seed {args.seed})")


if __name__ == "__main__":
    exit_on_user_error(main)
