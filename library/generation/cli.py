"""What sdxl_gen_img.py does with its parsed arguments: kohya's prompt loop, seeds and file names
around the shared Pipeline (sdxl_gen_img.py:1930-2830 is the behaviour followed).

Everything a user can get wrong (prompt lines, sizes, samplers, LoRA files, images) is checked
before the model is loaded or an output folder is made; images are written atomically.
"""

import glob
import logging
import os
import random
import sys
import time

from library.errors import UserError
from library.generation import prompts as prompt_lib
from library.generation.args import NO_EFFECT
from library.generation import samplers
from library.generation.pipeline import Pipeline
from library.generation.png import write_png
from library.generation.requests import GenerationOptions, ImageRequest, check_size

logger = logging.getLogger("sdxl_gen_img")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def _setup_logging(args):
    level = getattr(logging, args.console_log_level or "INFO")
    handlers = [logging.StreamHandler(sys.stderr)]
    if args.console_log_file:
        handlers.append(logging.FileHandler(args.console_log_file, encoding="utf-8"))
    fmt = "%(message)s" if args.console_log_simple else "%(levelname)s %(message)s"
    logging.basicConfig(level=level, format=fmt, handlers=handlers, force=True)


def _notices(args):
    for name, why in NO_EFFECT.items():
        value = getattr(args, name[2:])
        if value not in (None, False):
            logger.info("%s has no effect here: %s", name, why)


def check_args(args):
    """Option-level checks that need no model."""
    if not args.ckpt:
        raise UserError("--ckpt is required: an SDXL .safetensors file, a diffusers folder or a hub id")
    from library.arg_checks import GENERATOR_RANGES, check_folder_can_be_made, check_numbers
    check_numbers(args, GENERATOR_RANGES)
    check_folder_can_be_made(args.outdir, "--outdir")
    if args.fp16 and args.bf16:
        raise UserError("--fp16 and --bf16 are exclusive")
    if args.static_shapes and args.no_compile:
        raise UserError("--static_shapes is about compiled graphs; --no_compile compiles none")
    for name in ("steps", "images_per_prompt", "n_iter", "batch_size", "highres_fix_steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.W is not None or args.H is not None:
        check_size(args.W or prompt_lib.DEFAULT_SIZE, args.H or prompt_lib.DEFAULT_SIZE, "--W/--H")
    if args.strength is not None and not 0 <= args.strength <= 1:
        raise UserError(f"--strength must be between 0 and 1, got {args.strength}")
    if args.highres_fix_scale is not None and not 0 < args.highres_fix_scale < 1:
        raise UserError(f"--highres_fix_scale is the first pass's size ratio: between 0 and 1 "
                        f"(e.g. 0.5), got {args.highres_fix_scale}")
    if args.ddim_eta and samplers.canonical_name(args.sampler) != "ddim":
        raise UserError(f"--ddim_eta applies to the ddim sampler only, not {args.sampler}")
    if args.network_weights and not args.network_module:
        raise UserError("--network_weights needs --network_module networks.lora")
    if args.network_module and not args.network_weights:
        raise UserError("--network_module needs --network_weights (one LoRA file per module)")
    if args.network_weights:
        from library.generation.networks import check_counts
        check_counts(args.network_module, args.network_weights, args.network_mul)
    for path in args.network_weights or []:
        if not os.path.isfile(path):
            raise UserError(f"LoRA file not found: {path} (--network_weights)")
        from library.file_checks import refuse_non_finite
        refuse_non_finite(path)     # before the model load, not after
    if args.vae and not os.path.exists(args.vae):
        raise UserError(f"--vae: not found: {args.vae}")
    if args.image_path and not os.path.exists(args.image_path):
        raise UserError(f"--image_path: not found: {args.image_path}")
    if args.use_original_file_name and not args.image_path:
        raise UserError("--use_original_file_name needs --image_path (img2img)")
    if not (args.prompt or args.from_file or args.interactive or args.image_path):
        raise UserError("nothing to generate: give --prompt, --from_file, --interactive, or "
                        "--image_path with prompts in its PNG metadata")
    if args.bf16:
        from library.device import has_bf16_matmul
        if not has_bf16_matmul():
            raise UserError("--bf16 has no CPU kernels in MindSpore 2.7 (bf16 matmul); use --fp16 "
                            "or float32 on CPU")


def load_images(path):
    from PIL import Image
    if os.path.isdir(path):
        paths = sorted(p for p in glob.glob(os.path.join(path, "*")) if p.lower().endswith(IMAGE_SUFFIXES))
    else:
        paths = [path]
    if not paths:
        raise UserError(f"--image_path {path}: no .png/.jpg/.jpeg/.webp images in it")
    images = []
    for p in paths:
        try:
            img = Image.open(p)
            img.load()
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read image {p}: {e}") from None
        text = dict(getattr(img, "text", {}) or {})
        rgb = img.convert("RGB")    # a plain copy, which can carry the source's name and text
        rgb.filename, rgb.text = p, text
        images.append(rgb)
    return images


def prompt_lines(args, init_images):
    """The PromptLines to run (empty for --interactive)."""
    if args.interactive:
        return []
    if args.from_file:
        return prompt_lib.read_prompt_file(args.from_file)
    if args.prompt is not None:
        return [prompt_lib.parse_prompt_line(args.prompt, "--prompt")]
    lines = []
    for img in init_images:  # prompts from the source images' PNG text, as kohya
        if "prompt" not in img.text:
            raise UserError(f"{img.filename} has no 'prompt' PNG text: give --prompt or --from_file")
        raw = img.text["prompt"]
        if img.text.get("negative-prompt"):
            raw += " --n " + img.text["negative-prompt"]
        lines.append(prompt_lib.parse_prompt_line(raw, img.filename))
    return lines


class RequestMaker:
    """kohya's per-image settings: command-line values, overridden by the prompt line's options;
    seeds from --d, else pre-drawn from --seed, else random (2737-2757)."""

    def __init__(self, args, n_lines, init_images, highres):
        self.args, self.init_images, self.highres = args, init_images, highres
        self.predefined = None
        if args.seed is not None:
            random.seed(args.seed)
            self.predefined = [random.randint(0, 0x7FFFFFFF)
                               for _ in range(args.n_iter * n_lines * args.images_per_prompt)]
            if len(self.predefined) == 1:
                self.predefined[0] = args.seed
        self.global_step = 0
        self.iter_seed = None

    def new_iteration(self):
        self.iter_seed = random.randint(0, 0x7FFFFFFF)

    def requests_for(self, line):
        a, out = self.args, []
        for pi in range(a.images_per_prompt):
            if line.seeds:
                seed = prompt_lib.seed_for_image(line.seeds, pi)
            elif self.predefined:
                seed = self.predefined.pop(0)
            elif a.iter_same_seed and self.iter_seed is not None:
                seed = self.iter_seed          # kohya's intent; its code raises a TypeError here
            else:
                seed = random.randint(0, 0x7FFFFFFF)
            r = ImageRequest(
                prompt=line.prompt, seed=seed, negative_prompt=line.negative_prompt,
                width=_pick(line.width, a.W, prompt_lib.DEFAULT_SIZE),
                height=_pick(line.height, a.H, prompt_lib.DEFAULT_SIZE),
                steps=_pick(line.steps, a.steps), scale=_pick(line.scale, a.scale), sampler=a.sampler,
                original_width=_pick(line.original_width, a.original_width),
                original_height=_pick(line.original_height, a.original_height),
                original_width_negative=_pick(line.original_width_negative, a.original_width_negative),
                original_height_negative=_pick(line.original_height_negative, a.original_height_negative),
                crop_top=_pick(line.crop_top, a.crop_top), crop_left=_pick(line.crop_left, a.crop_left),
                strength=_pick(line.strength, a.strength, 0.8),
                network_muls=tuple(line.network_muls) if line.network_muls else None,
                clip_prompt=line.clip_prompt, raw_prompt=line.raw, index=self.global_step)
            if self.init_images:
                img = self.init_images[self.global_step % len(self.init_images)]
                r.init_image, r.source_name = img, img.filename
                if not self.highres:   # img2img runs at the source's size, rounded down to /32
                    w, h = img.size
                    r.width, r.height = w - w % 32, h - h % 32
                    if (r.width, r.height) != img.size:
                        logger.warning("%s: %dx%d is not a multiple of 32; generating %dx%d (aspect "
                                       "changes)", img.filename, w, h, r.width, r.height)
            out.append(r)
            self.global_step += 1
        return out


def _pick(*values):
    return next((v for v in values if v is not None), None)


class ImageWriter:
    """kohya's file names, written atomically (temp file + rename) into --outdir."""

    def __init__(self, args):
        self.args = args
        self.written = []

    def name_for(self, result, batch_position):
        a, r = self.args, result.request
        if a.use_original_file_name and r.source_name:
            return os.path.splitext(os.path.basename(r.source_name))[0] + ".png"
        if a.sequential_file_name:
            return f"im_{result.stage}{r.index + 1:06d}.png"
        ts = time.strftime("%Y%m%d%H%M%S", time.localtime())
        return f"im_{ts}_{result.stage}{batch_position:03d}_{r.seed}.png"

    def __call__(self, result, batch_position=0):
        os.makedirs(self.args.outdir, exist_ok=True)
        name = self.name_for(result, batch_position)
        path = os.path.join(self.args.outdir, name)
        stem, n = os.path.splitext(path)[0], 1
        while os.path.exists(path) and not self.args.use_original_file_name:
            path, n = f"{stem}_{n}.png", n + 1     # never overwrite an earlier image of this run
        write_png(path, result)
        self.written.append(path)
        logger.info("saved %s", path)


def _cast_vae(models, dtype):
    import numpy as np
    from mindspore import Tensor
    for p in models.vae.get_parameters():
        if p.dtype != dtype:
            data = p.asnumpy().astype(np.float32)
            p.set_dtype(dtype)
            p.set_data(Tensor(data, dtype=dtype))


def run(args):
    _setup_logging(args)
    _notices(args)
    check_args(args)
    highres = args.highres_fix_scale is not None
    init_images = load_images(args.image_path) if args.image_path else None
    lines = prompt_lines(args, init_images or [])
    if init_images and args.prompt is None and args.from_file is None and not args.interactive:
        init_images = [img for img in init_images for _ in range(args.images_per_prompt)]
    if init_images and args.W is not None and args.H is not None:
        from PIL import Image
        w, h = args.W, args.H
        if highres:
            w, h = int(w * args.highres_fix_scale + 0.5), int(h * args.highres_fix_scale + 0.5)
        logger.info("resizing img2img sources to %dx%d", w, h)
        resized = []
        for img in init_images:
            r = img.resize((w, h), resample=Image.LANCZOS)
            r.filename, r.text = img.filename, img.text
            resized.append(r)
        init_images = resized
    n_iter = 1 if args.interactive else args.n_iter
    args.n_iter = n_iter
    maker = RequestMaker(args, len(lines), init_images, highres)
    options = GenerationOptions(
        batch_size=args.batch_size, max_embeddings_multiples=args.max_embeddings_multiples or 1,
        eta=args.ddim_eta, highres_fix_scale=args.highres_fix_scale,
        highres_fix_steps=args.highres_fix_steps, highres_fix_strength=args.highres_fix_strength,
        highres_fix_latents_upscaling=args.highres_fix_latents_upscaling,
        highres_fix_save_1st=args.highres_fix_save_1st, vae_batch_size=args.vae_batch_size,
        compile=not args.no_compile, static_shapes=args.static_shapes, model_name=os.path.splitext(os.path.basename(args.ckpt.rstrip("/")))[0])

    # Build every request before loading anything, so a bad prompt line or size fails first.
    iterations = []
    for it in range(n_iter):
        maker.new_iteration()
        iterations.append([r for line in lines for r in maker.requests_for(line)])
    for reqs in iterations:
        for r in reqs:
            check_size(r.width, r.height, f"image size of prompt {r.prompt[:40]!r}")

    if args.network_show_meta and args.network_weights:
        from library.generation.networks import show_metadata
        show_metadata(args.network_weights)

    # MindSpore's import (about 2 s) comes after every check above, so bad input fails at once
    from library import device
    device.configure(parallel_dispatch=False)
    from library.models import load_sdxl
    import mindspore as ms
    dtype = "float16" if args.fp16 else "bfloat16" if args.bf16 else "float32"
    start = time.perf_counter()
    models = load_sdxl(args.ckpt, dtype)
    if args.vae:
        from library.generation.networks import replace_vae
        replace_vae(models, args.vae)
    if args.no_half_vae and dtype != "float32":
        _cast_vae(models, ms.float32)
    networks = None
    if args.network_module:
        from library.generation.networks import GenerationNetworks
        networks = GenerationNetworks(models, args.network_module, args.network_weights, args.network_mul,
                                      merge=args.network_merge, merge_n_models=args.network_merge_n_models,
                                      pre_calc=args.network_pre_calc, network_args=args.network_args)
    pipe = Pipeline(models, options, networks)
    logger.info("pipeline is ready (models loaded in %.1f s)", time.perf_counter() - start)
    for reqs in iterations:     # every check that needs no UNet call, before the first image
        pipe.validate(reqs)

    writer = ImageWriter(args)

    def on_image(result):
        writer(result, result.batch_position)

    if args.interactive:
        _interactive(args, maker, pipe, on_image)
    else:
        total = len(lines)
        for it, reqs in enumerate(iterations):
            logger.info("iteration %d/%d", it + 1, n_iter)
            for i, line in enumerate(lines):
                logger.info("prompt %d/%d: %s", i + 1, total, line.prompt)
            pipe.generate(reqs, on_image)
    logger.info("done! %s", pipe.stats.summary())
    print(f"{len(writer.written)} image(s) written to {args.outdir}; {pipe.stats.summary()}")


def _interactive(args, maker, pipe, on_image):
    while True:
        print("Type prompt:", flush=True)
        try:
            raw = input()
        except EOFError:
            return
        if not raw.strip().split(" --")[0].strip():
            continue
        try:
            line = prompt_lib.parse_prompt_line(raw, "prompt")
            reqs = maker.requests_for(line)
            for r in reqs:
                print(f"seed: {r.seed}", flush=True)
            pipe.generate(reqs, on_image)
        except UserError as e:      # a bad line is reported; the session goes on
            print(f"error: {e}", file=sys.stderr, flush=True)
