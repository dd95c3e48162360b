"""One batch's step inputs: the loader's sample dicts to the arrays the grad step takes (cached or
encoded-in-the-step latents and text, size conditioning, this batch's noise draws, loss weights
and masks), in the step's argument order, and those arrays as Tensors. Host code (numpy);
used by the training loop, validation and the ahead-of-step-1 compile."""

import numpy as np


# A batch's random numbers come from generators seeded by (seed, stream, epoch, batch index):
# they depend on the batch alone, not on what ran before it (resume, data-parallel ranks).
NOISE_STREAM, VAE_STREAM = 0, 1


class BatchAssembler:
    """From the loader's sample dicts to the step's input tensors, with this batch's noise."""

    def __init__(self, models, layout, noise_sampler, args, tokenizers):
        self.layout = layout
        self.noise_sampler = noise_sampler
        self.max_token_length = args.max_token_length
        self.tokenizers = tokenizers
        self.seed = args.seed
        self.downscale = models.config.vae.downscale

    def _text(self, captions, samples):
        from library.conditioning import merge_weights
        from library.text import tokenize_chunks, tokenize_weighted
        if self.layout.text_cached:
            return (np.stack([s["text_context"] for s in samples]).astype(np.float32),
                    np.stack([s["text_pooled"] for s in samples]).astype(np.float32),
                    np.zeros(1, np.float32), np.zeros(1, np.float32))
        tok1, tok2 = self.tokenizers
        if self.layout.weighted:
            ids1, w1 = tokenize_weighted(tok1, captions, self.max_token_length)
            ids2, w2 = tokenize_weighted(tok2, captions, self.max_token_length)
            return ids1, ids2, merge_weights(w1), merge_weights(w2)
        return (tokenize_chunks(tok1, captions, self.max_token_length),
                tokenize_chunks(tok2, captions, self.max_token_length),
                np.zeros(1, np.float32), np.zeros(1, np.float32))

    def __call__(self, samples):
        from library.resample import area_resize
        key = samples[0]["batch_key"]
        if self.layout.latents_cached:
            pixels = np.stack([s["latents"] for s in samples]).astype(np.float32)
            latent_shape = pixels.shape
            vae_noise = np.zeros(1, np.float32)
        else:
            pixels = np.stack([s["image"] for s in samples]).astype(np.float32)
            b, _, h, w = pixels.shape
            latent_shape = (b, 4, h // self.downscale, w // self.downscale)
            vae_noise = np.random.default_rng([self.seed, VAE_STREAM, *key]).standard_normal(
                latent_shape).astype(np.float32)
        captions = [s["caption"] for s in samples]
        text = self._text(captions, samples)

        def pairs(key):
            return np.array([s[key] for s in samples], dtype=np.float32)

        draws = self.noise_sampler.draw(latent_shape, (NOISE_STREAM, *key))
        mask = np.zeros(1, np.float32)
        if self.layout.masked:
            masks = [s["alpha_mask"] if s.get("alpha_mask") is not None
                     else np.ones(latent_shape[2:], np.float32) for s in samples]
            mask = np.stack([area_resize(np.asarray(m, np.float32), latent_shape[2:])
                             for m in masks])[:, None]
        loss_weights = pairs("loss_weight")
        inputs = (pixels, vae_noise, *text, pairs("original_size_hw"), pairs("crop_top_left"),
                  pairs("target_size_hw"), draws.noise, draws.offset_noise,
                  np.float32(draws.offset_strength), draws.pyramid, draws.ip_noise,
                  np.float32(draws.ip_strength), draws.timesteps.astype(np.int32), loss_weights,
                  mask)
        return inputs, draws.timesteps


def to_tensors(arrays):
    """The assembled arrays as the step's input Tensors."""
    from mindspore import Tensor
    return tuple(Tensor(np.asarray(a)) for a in arrays)
