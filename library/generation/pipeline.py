"""The SDXL generation pipeline shared by sdxl_gen_img.py and training-time samples.

    pipe = Pipeline(models, GenerationOptions(batch_size=2), networks=None)
    results = pipe.generate([ImageRequest("a cat", seed=1, width=1024, height=1024), ...])
    results[0].image, results[0].latents, results[0].metadata; pipe.stats.summary()

What one call does, following kohya's sdxl_gen_img (the line numbers are sdxl_gen_img.py's):
- requests are grouped into batches of consecutive requests that share size, steps, scale,
  strength, sampler, size conditioning and LoRA multipliers, up to `batch_size` (2818-2826);
- text: both tokenizers' prompts in 77-token chunks with weights (`prompts.text_plan`), each
  encoder's hidden_states[-2] concatenated, weighted with the mean re-normalisation, text
  encoder 2's pooled output from chunk 0; the negative prompt the same way, for CFG (484-592).
  `text_rule="training"` uses training's rule instead (75n+2 tokens, no re-normalisation);
- `y` = pooled + size embedding of (original, crop, target), the negative original sizes for the
  unconditional half (545-565);
- the guided UNet step (unconditional and conditional halves in one 2B call, then
  uncond + scale * (cond - uncond)) is compiled with ms.jit once, with its batch, latent size
  and prompt length left open (`set_inputs` with None dimensions), and reused for every size,
  batch, step, prompt, seed and image; a scale of 1 uses the plain UNet step (its own graph).
  A run whose batches all have one shape (the first generate() call decides; training samples
  with one size) compiles that shape's graph instead, about 1.4x faster per step on CPU, and
  moves to the open graph if a later call brings another shape (a longer prompt, a new size);
  `static_shapes` compiles one graph per input shape, as this port used to;
- the sampler (`samplers.sample`) runs on the host; noise comes from one numpy Generator per image
  seeded with its seed, so an image depends only on its seed (kohya's pre-drawn noise, 2282-2293);
- img2img: the init image is resized to the target size (LANCZOS), encoded and sampled by the
  VAE, then noised at kohya's start step (`samplers.img2img_start`);
- highres fix: a first pass at the scaled size (rounded down to /32) with `highres_fix_steps`,
  then an upscale (LANCZOS on the decoded image, or bilinear on the latents) and an img2img
  second pass at the full size with seed + 1 (2103-2194);
- the VAE decodes (x / 2 + 0.5 clipped, rounded to uint8).
Timings are kept in `pipe.stats`: graph compile time, and seconds per image without it.
"""

import logging
import time
from dataclasses import replace
from typing import Callable, Optional

import numpy as np

from library.errors import UserError
from library.resample import bilinear_resize
from library.generation import prompts as prompt_lib
from library.generation import samplers
from library.generation.guidance import open_signature, param_dtype, step_cells
from library.generation.png import array_to_image, image_to_array, png_metadata
from library.generation.requests import (DOWNSAMPLING, LATENT_CHANNELS, GeneratedImage,
                                         GenerationOptions, GenerationStats, check_size,
                                         highres_first_size, scaled)

logger = logging.getLogger(__name__)


class Pipeline:
    """Generation with loaded models. Keep one Pipeline for a whole run: its compiled graphs are
    reused by every later generate() call with the same shapes."""

    def __init__(self, models, options=None, networks=None):
        from library.text import load_tokenizers
        self.models = models
        self.options = options or GenerationOptions()
        self.networks = networks        # generation.networks.GenerationNetworks or None
        self.tokenizers = load_tokenizers()
        self.stats = GenerationStats()
        if self.options.text_rule not in ("generator", "training"):
            raise UserError(f"unknown text rule {self.options.text_rule!r}: use 'generator' or 'training'")
        self._cells, self._ms = step_cells(models.unet)
        self._steps = [self._ms.jit(c.construct) if self.options.compile else c
                       for c in self._cells]
        self._open_shapes = None        # one graph for all shapes: decided by the first run
        self._one_shape = {}            # guided or not -> the input shapes of its graph
        self._unet_dtype = param_dtype(models.unet)
        self._vae_dtype = param_dtype(models.vae)
        self._first_calls = []

    # -- public --------------------------------------------------------------------------

    def validate(self, requests):
        """Check every request before anything runs (sizes, samplers, steps, strengths), so a
        bad one fails the run before the first image rather than halfway."""
        o = self.options
        for r in requests:
            check_size(r.width, r.height, "image size")
            name = samplers.canonical_name(r.sampler)
            samplers.schedule(name, r.steps)
            if o.highres_fix_scale:
                w1, h1 = highres_first_size(r.width, r.height, o.highres_fix_scale)
                if w1 <= 0 or h1 <= 0:
                    raise UserError(f"--highres_fix_scale {o.highres_fix_scale}: the first pass of "
                                    f"{r.width}x{r.height} would be {w1}x{h1}")
                samplers.schedule(name, o.highres_fix_steps)
            if r.init_image is not None or o.highres_fix_scale:
                samplers.img2img_start(name, r.steps, r.strength, o.sampler_preset)
            if self.networks is not None:
                self.networks.check_muls(r.network_muls)

    def batches(self, requests):
        """kohya's batching: consecutive requests with equal settings, up to batch_size."""
        batch = []
        for r in requests:
            if batch and (batch[-1].batch_key() != r.batch_key() or len(batch) == self.options.batch_size):
                yield batch
                batch = []
            batch.append(r)
        if batch:
            yield batch

    def generate(self, requests, on_image: Optional[Callable[[GeneratedImage], None]] = None):
        """Images for `requests`, in order (highres fix with save_1st: each first pass right
        before its final image). `on_image` is called with each image as soon as it exists."""
        requests = list(requests)
        self.validate(requests)
        if self._open_shapes is None:
            self._open_shapes = self._needs_open_shapes(requests)
        results = []
        start = time.perf_counter()
        try:
            for batch in self.batches(requests):
                for result in self._generate_batch(batch):
                    results.append(result)
                    if on_image is not None:
                        on_image(result)
        finally:
            self.stats.seconds += time.perf_counter() - start
            self.stats.images += sum(1 for r in results if r.stage in ("", "1"))
            self._update_compile_time()
        return results

    def _needs_open_shapes(self, requests):
        """True when these requests' batches give a UNet step (guided or plain) more than one
        latent shape: sizes, highres fix's first pass, batch sizes (a short last batch)."""
        o = self.options
        shapes = set()
        for batch in self.batches(requests):
            r = batch[0]
            sizes = [(r.width, r.height)]
            if o.highres_fix_scale:
                sizes.append(highres_first_size(r.width, r.height, o.highres_fix_scale))
            shapes.update((r.scale > 1.0, len(batch), w, h) for w, h in sizes)
        return len(shapes) > len({guided for guided, *_ in shapes})

    # -- one batch ------------------------------------------------------------------------

    def _generate_batch(self, batch):
        o, r0 = self.options, batch[0]
        n_real = len(batch)
        # With static shapes, a short last batch reuses the full batch's graph (padding rows
        # are dropped) instead of compiling another one.
        if o.compile and o.static_shapes and n_real < o.batch_size and any(sig[0][0] == o.batch_size and sig[0][2:] ==
                                         (r0.height // 8, r0.width // 8) for sig in self.stats.graphs):
            batch = batch + [batch[-1]] * (o.batch_size - n_real)
        muls = None
        if self.networks is not None:
            muls = self.networks.activate(r0.network_muls)
        seeds = [r.seed for r in batch]
        inits = [r.init_image for r in batch] if r0.init_image is not None else None
        out = []
        if o.highres_fix_scale:
            s = o.highres_fix_scale
            w1, h1 = highres_first_size(r0.width, r0.height, s)
            cond1 = dict(original_width=scaled(r0.original_width, s), original_height=scaled(r0.original_height, s),
                         original_width_negative=scaled(r0.original_width_negative, s),
                         original_height_negative=scaled(r0.original_height_negative, s),
                         crop_top=scaled(r0.crop_top, s), crop_left=scaled(r0.crop_left, s))
            strength1 = r0.strength if o.highres_fix_strength is None else o.highres_fix_strength
            logger.info("highres fix: first pass %dx%d, %d steps", w1, h1, o.highres_fix_steps)
            lat1 = self._stage(batch, w1, h1, o.highres_fix_steps, strength1, inits, seeds, cond1)
            images1 = None
            if o.highres_fix_save_1st or not o.highres_fix_latents_upscaling:
                images1 = self.decode(lat1)
            if o.highres_fix_save_1st:
                for i, (r, img, lat) in enumerate(list(zip(batch, images1, lat1))[:n_real]):
                    r1 = replace(r, width=w1, height=h1, steps=o.highres_fix_steps, **cond1)
                    out.append(GeneratedImage(img, lat, r, "0", png_metadata(
                        r1, w1, h1, "0", o, self._names(), muls), i))
            if o.highres_fix_latents_upscaling:
                inits = list(bilinear_resize(lat1, (r0.height // 8, r0.width // 8)))
            else:
                from PIL import Image
                inits = [img.resize((r0.width, r0.height), resample=Image.LANCZOS) for img in images1]
            cond = self._cond_of(r0)
            latents = self._stage(batch, r0.width, r0.height, r0.steps, r0.strength, inits,
                                  [sd + 1 for sd in seeds], cond)
            stage = "1"
        else:
            latents = self._stage(batch, r0.width, r0.height, r0.steps, r0.strength, inits, seeds,
                                  self._cond_of(r0))
            stage = ""
        images = self.decode(latents)
        for i, (r, img, lat) in enumerate(list(zip(batch, images, latents))[:n_real]):
            out.append(GeneratedImage(img, lat, r, stage, png_metadata(
                r, r0.width, r0.height, stage, o, self._names(), muls), i))
        return out

    def _names(self):
        return self.networks.names if self.networks is not None else None

    @staticmethod
    def _cond_of(r):
        return dict(original_width=r.original_width, original_height=r.original_height,
                    original_width_negative=r.original_width_negative,
                    original_height_negative=r.original_height_negative,
                    crop_top=r.crop_top, crop_left=r.crop_left)

    def _stage(self, batch, width, height, steps, strength, inits, seeds, cond):
        """One sampling pass -> final latents (B, 4, h, w), VAE scale applied."""
        check_size(width, height)
        o, r0 = self.options, batch[0]
        shape = (LATENT_CHANNELS, height // DOWNSAMPLING, width // DOWNSAMPLING)
        rngs = [np.random.default_rng(seed) for seed in seeds]
        noise = np.stack([g.standard_normal(shape, dtype=np.float32) for g in rngs])
        init_latents = None
        if inits is not None:
            init_latents = self.encode_init_images(inits, width, height, rngs)
        cfg = r0.scale > 1.0          # kohya: guidance_scale <= 1 runs the conditional half only
        context, y = self._condition([r.prompt for r in batch],
                                     [r.negative_prompt for r in batch] if cfg else None,
                                     width, height, cond)
        scale = self._ms.Tensor(np.full((len(batch), 1, 1, 1), r0.scale, np.float32))

        def model(x_in, t):
            return self._unet_call(x_in, t, context, y, scale)

        return samplers.sample(r0.sampler, model, noise, steps, rngs, prediction_type=o.prediction_type,
                               preset=o.sampler_preset, eta=o.eta, init=init_latents,
                               strength=strength if init_latents is not None else None)

    def _unet_call(self, x_in, t, context, y, scale):
        ms = self._ms
        x = ms.Tensor(np.ascontiguousarray(x_in), dtype=self._unet_dtype)
        tt = ms.Tensor(np.full((context.shape[0],), t, np.float32))
        guided = context.shape[0] != x.shape[0]
        inputs = (x, tt, context, y, scale) if guided else (x, tt, context, y)
        index = 0 if guided else 1
        cell = self._cells[index]
        shapes = (tuple(x.shape), tuple(context.shape))
        if self.options.compile and not self.options.static_shapes:
            if not self._open_shapes and self._one_shape.setdefault(guided, shapes) != shapes:
                self._open_shapes = True            # another shape after all: one graph for all
            if self._open_shapes and not cell.get_inputs():
                cell.set_inputs(*open_signature(inputs))
                self._steps[index] = ms.jit(cell.construct)
        open_graph = self.options.compile and bool(cell.get_inputs())
        signature = (guided, str(self._unet_dtype)) if open_graph else shapes + (str(self._unet_dtype),)
        start = time.perf_counter()
        out = self._steps[index](*inputs).asnumpy().astype(np.float32)
        seconds = time.perf_counter() - start
        if signature not in self.stats.graphs:
            self.stats.graphs.append(signature)
            self._first_calls.append(seconds)
            if self.options.compile:
                logger.info("compiled the UNet step for latents %s, context %s in %.1f s%s",
                            tuple(x.shape), tuple(context.shape), seconds,
                            " (one graph for all shapes)" if open_graph else "")
        else:
            self.stats.step_seconds.append(seconds)
        return out

    def _update_compile_time(self):
        # compile time = first calls minus what an ordinary step costs (the first call runs one)
        self.stats.compile_seconds = max(0.0, sum(self._first_calls) - len(self._first_calls) * self.stats.median_step)

    # -- text and size conditioning --------------------------------------------------------

    def _encode_chunks(self, text_encoder, tokens):
        """(B, n, 77) ids -> hidden_states[-2] (B, 77n, C) and pooled of chunk 0 (B, P), numpy."""
        ms = self._ms
        b, n = tokens.shape[:2]
        _, pooled, hidden = text_encoder(ms.Tensor(tokens.reshape(b * n, -1).astype(np.int32)))
        h = hidden[-2].asnumpy().astype(np.float32).reshape(b, n * tokens.shape[2], -1)
        return h, pooled.asnumpy().astype(np.float32).reshape(b, n, -1)[:, 0]

    def _text(self, prompts, negatives):
        """(context, pooled) for prompts and, when negatives is not None, for the negatives."""
        m, o = self.models, self.options
        encoders = (m.text_encoder1, m.text_encoder2)
        if o.text_rule == "training":
            from library.conditioning import encode_text
            from library.text import tokenize_weighted
            out = []
            for texts in [prompts] + ([negatives] if negatives is not None else []):
                (ids1, w1), (ids2, w2) = (tokenize_weighted(t, texts, o.max_token_length) for t in self.tokenizers)
                context, pooled = encode_text(*encoders, ids1, ids2, w1, w2)
                out.append((context.asnumpy().astype(np.float32), pooled.asnumpy().astype(np.float32)))
            return out[0], (out[1] if negatives is not None else None)
        cond_h, uncond_h, pooled, uncond_pooled = [], [], None, None
        for tokenizer, encoder in zip(self.tokenizers, encoders):
            plan = prompt_lib.text_plan(tokenizer, prompts, negatives, o.max_embeddings_multiples)
            h, p = self._encode_chunks(encoder, plan.tokens)
            cond_h.append(prompt_lib.weighted_embeddings(h, plan.weights))
            pooled = p                       # the last encoder's (TE2) pooled output
            if negatives is not None:
                h, p = self._encode_chunks(encoder, plan.uncond_tokens)
                uncond_h.append(prompt_lib.weighted_embeddings(h, plan.uncond_weights))
                uncond_pooled = p
        cond = (np.concatenate(cond_h, axis=-1), pooled)
        uncond = (np.concatenate(uncond_h, axis=-1), uncond_pooled) if negatives is not None else None
        return cond, uncond

    def _condition(self, prompts, negatives, width, height, cond):
        """(context, y) Tensors: B rows without CFG, else 2B rows, unconditional first."""
        from library.conditioning import vector_condition
        ms = self._ms
        b = len(prompts)
        oh = cond["original_height"] if cond["original_height"] is not None else height
        ow = cond["original_width"] if cond["original_width"] is not None else width
        ohn = cond["original_height_negative"] if cond["original_height_negative"] is not None else oh
        own = cond["original_width_negative"] if cond["original_width_negative"] is not None else ow
        crop = [cond["crop_top"] or 0, cond["crop_left"] or 0]

        def pairs(hw):
            return ms.Tensor(np.tile(np.array([hw], np.float32), (b, 1)))

        (context, pooled), uncond = self._text(prompts, negatives)
        dim = self.models.config.unet.size_embed_dim
        y = vector_condition(ms.Tensor(pooled), pairs([oh, ow]), pairs(crop), pairs([height, width]), dim)
        if uncond is not None:
            y_u = vector_condition(ms.Tensor(uncond[1]), pairs([ohn, own]), pairs(crop),
                                   pairs([height, width]), dim)
            context = np.concatenate([uncond[0], context])
            y = ms.ops.cat([y_u, y], axis=0)
        return (ms.Tensor(context).astype(self._unet_dtype), y.astype(self._unet_dtype))

    # -- VAE -------------------------------------------------------------------------------

    def _vae_chunks(self, n):
        v = self.options.vae_batch_size
        if v is None:
            return n
        return max(1, int(n * v)) if v < 1 else int(v)

    def encode_init_images(self, inits, width, height, rngs):
        """img2img sources -> latents (B, 4, h, w): latents pass through; images are resized to
        the stage size, encoded, and sampled with noise from each image's generator."""
        ms = self._ms
        if isinstance(inits[0], np.ndarray):
            return np.stack(inits).astype(np.float32)
        vae, scaling = self.models.vae, self.models.config.vae.scaling_factor
        arrays = np.stack([image_to_array(img, width, height) for img in inits])
        shape = (LATENT_CHANNELS, height // DOWNSAMPLING, width // DOWNSAMPLING)
        vae_noise = np.stack([g.standard_normal(shape, dtype=np.float32) for g in rngs])
        out, step = [], self._vae_chunks(len(arrays))
        for i in range(0, len(arrays), step):
            moments = vae.encode(ms.Tensor(arrays[i:i + step], dtype=self._vae_dtype))
            lat = vae.sample_latent(moments, ms.Tensor(vae_noise[i:i + step], dtype=self._vae_dtype))
            out.append(lat.asnumpy().astype(np.float32) * scaling)
        return np.concatenate(out)

    def decode(self, latents):
        """Latents (B, 4, h, w), scaled -> PIL images, through the VAE in its chunks."""
        ms = self._ms
        vae, scaling = self.models.vae, self.models.config.vae.scaling_factor
        images, step = [], self._vae_chunks(len(latents))
        for i in range(0, len(latents), step):
            decoded = vae.decode(ms.Tensor(latents[i:i + step] / scaling, dtype=self._vae_dtype))
            images += [array_to_image(a) for a in decoded.asnumpy().astype(np.float32)]
        return images
