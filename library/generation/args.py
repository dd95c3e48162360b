"""sdxl_gen_img.py's command line: kohya's option names and defaults, the options this port adds,
and kohya's options it does not implement, which are rejected by name before anything runs (see
docs/generation.md). No MindSpore here: a bad option fails at once."""

import argparse
import sys

from library.generation.samplers import SAMPLER_NAMES

# kohya's options that are not implemented: name -> (argparse kwargs, what it is)
UNSUPPORTED = {
    "--mask_path": (dict(type=str), "inpainting"),
    "--vae_slices": (dict(type=int), "sliced VAE"),
    "--replace_clip_l14_336": (dict(action="store_true"), "CLIP-L/14-336 text encoder"),
    "--diffusers_xformers": (dict(action="store_true"), "diffusers' xformers hook"),
    "--opt_channels_last": (dict(action="store_true"), "channels_last"),
    "--network_regional_mask_max_color_codes": (dict(type=int), "regional LoRA"),
    "--textual_inversion_embeddings": (dict(type=str, nargs="*"), "textual inversion"),
    "--guide_image_path": (dict(type=str, nargs="*"), "ControlNet guide images"),
    "--highres_fix_upscaler": (dict(type=str), "highres fix upscaler modules"),
    "--highres_fix_upscaler_args": (dict(type=str), "highres fix upscaler modules"),
    "--highres_fix_disable_control_net": (dict(action="store_true"), "ControlNet"),
    "--negative_scale": (dict(type=float), "negative scale (broken in kohya's sdxl_gen_img)"),
    "--control_net_lllite_models": (dict(type=str, nargs="*"), "ControlNet-LLLite"),
    "--control_net_multipliers": (dict(type=float, nargs="*"), "ControlNet-LLLite"),
    "--control_net_ratios": (dict(type=float, nargs="*"), "ControlNet-LLLite"),
    "--clip_vision_strength": (dict(type=float), "CLIP vision conditioning"),
    "--ds_depth_1": (dict(type=int), "Deep Shrink"),
    "--ds_timesteps_1": (dict(type=int), "Deep Shrink"),
    "--ds_depth_2": (dict(type=int), "Deep Shrink"),
    "--ds_timesteps_2": (dict(type=int), "Deep Shrink"),
    "--ds_ratio": (dict(type=float), "Deep Shrink"),
    "--gradual_latent_timesteps": (dict(type=int), "Gradual Latent"),
    "--gradual_latent_ratio": (dict(type=float), "Gradual Latent"),
    "--gradual_latent_ratio_step": (dict(type=float), "Gradual Latent"),
    "--gradual_latent_every_n_steps": (dict(type=int), "Gradual Latent"),
    "--gradual_latent_s_noise": (dict(type=float), "Gradual Latent"),
    "--gradual_latent_unsharp_params": (dict(type=str), "Gradual Latent"),
}
# Accepted for kohya command-line compatibility; they change nothing here, and say so when given.
NO_EFFECT = {
    "--xformers": "attention is chosen per device by library/layers.py",
    "--sdpa": "attention is chosen per device by library/layers.py",
    "--clip_skip": "kohya's SDXL generator ignores it too (always the penultimate layer)",
    "--tokenizer_cache_dir": "the CLIP tokenizers ship with this repository",
    "--no_preview": "images are never shown in a window",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):   # one `error:` line and exit code 2, like every UserError
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def _unsupported(what):
    class Reject(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            parser.error(f"{option_string} ({what}) is not supported yet")
    return Reject


def setup_parser():
    p = _Parser(description="SDXL image generation (kohya sdxl_gen_img.py options) on MindSpore.")
    a = p.add_argument
    a("--console_log_level", type=str, default=None, choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"])
    a("--console_log_file", type=str, default=None)
    a("--console_log_simple", action="store_true")
    a("--prompt", type=str, default=None, help="prompt (in-prompt options such as --n --d --w allowed)")
    a("--from_file", type=str, default=None, help="prompt file: one prompt per line; # comments")
    a("--interactive", action="store_true", help="read prompts from stdin (n_iter becomes 1)")
    a("--image_path", type=str, default=None, help="img2img source image or folder")
    a("--strength", type=float, default=None, help="img2img strength (default 0.8)")
    a("--images_per_prompt", type=int, default=1)
    a("--outdir", type=str, default="outputs")
    a("--sequential_file_name", action="store_true", help="name files im_000001.png, ...")
    a("--use_original_file_name", action="store_true", help="img2img: name outputs after the source")
    a("--ddim_eta", type=float, default=0.0, help="ddim eta (0: deterministic)")
    a("--n_iter", type=int, default=1)
    a("--H", type=int, default=None, help="image height (default 1024)")
    a("--W", type=int, default=None, help="image width (default 1024)")
    a("--original_height", type=int, default=None)
    a("--original_width", type=int, default=None)
    a("--original_height_negative", type=int, default=None)
    a("--original_width_negative", type=int, default=None)
    a("--crop_top", type=int, default=None)
    a("--crop_left", type=int, default=None)
    a("--batch_size", type=int, default=1)
    a("--vae_batch_size", type=float, default=None, help="VAE batch (< 1: a ratio of --batch_size)")
    a("--no_half_vae", action="store_true", help="VAE in float32 with --fp16/--bf16")
    a("--steps", type=int, default=50)
    a("--sampler", type=str, default="ddim", choices=SAMPLER_NAMES)
    a("--scale", type=float, default=7.5, help="CFG scale; <= 1 disables guidance")
    a("--ckpt", type=str, default=None, help="SDXL .safetensors, diffusers folder or hub id")
    a("--vae", type=str, default=None, help="replacement VAE (.safetensors or diffusers folder)")
    a("--seed", type=int, default=None)
    a("--iter_same_seed", action="store_true", help="without --seed: one random seed per iteration")
    a("--fp16", action="store_true")
    a("--bf16", action="store_true")
    a("--network_module", type=str, default=None, nargs="*")
    a("--network_weights", type=str, default=None, nargs="*")
    a("--network_mul", type=float, default=None, nargs="*")
    a("--network_args", type=str, default=None, nargs="*", help="per network: \"k=v;k2=v2\"")
    a("--network_show_meta", action="store_true")
    a("--network_merge_n_models", type=int, default=None)
    a("--network_merge", action="store_true")
    a("--network_pre_calc", action="store_true")
    a("--max_embeddings_multiples", type=int, default=None, help="prompt length = 75 x N tokens")
    a("--highres_fix_scale", type=float, default=None)
    a("--highres_fix_steps", type=int, default=28)
    a("--highres_fix_strength", type=float, default=None)
    a("--highres_fix_save_1st", action="store_true")
    a("--highres_fix_latents_upscaling", action="store_true")
    for name in ("--xformers", "--sdpa", "--no_preview"):
        a(name, action="store_true", help=f"no effect: {NO_EFFECT[name]}")
    a("--clip_skip", type=int, default=None, help=f"no effect: {NO_EFFECT['--clip_skip']}")
    a("--tokenizer_cache_dir", type=str, default=None, help=f"no effect: {NO_EFFECT['--tokenizer_cache_dir']}")
    # Port-specific (not in kohya):
    a("--no_compile", action="store_true", help="run the UNet in PyNative mode instead of a compiled graph")
    a("--static_shapes", action="store_true",
      help="(this port) one compiled UNet graph per latent size, batch and prompt length instead "
           "of one graph for all of them (a run of one shape compiles that shape's graph either "
           "way)")
    for name, (kwargs, what) in UNSUPPORTED.items():
        kwargs = dict(kwargs)
        nargs = "?" if kwargs.pop("action", None) else kwargs.pop("nargs", None)
        p.add_argument(name, action=_unsupported(what), nargs=nargs or None, type=kwargs.get("type"),
                       help=argparse.SUPPRESS)
    return p
