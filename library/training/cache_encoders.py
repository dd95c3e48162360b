"""The MindSpore side of the caches: encode functions built from the models, and the two calls
the trainer makes before training (the cache logic itself is plain numpy, library/data/cache/,
whose check_cache_options runs first).

    latents = cache_latents(train, models, args)            # LatentCache: .get(record, flipped)
    texts = cache_text_outputs(train, models, args)         # TextCache: .get(record) -> (context, pooled)

Under msrun pass world=distributed.init(): each rank encodes its share of the entries and all
ranks end with the whole cache (library/data/cache/__init__.py, "Data parallel").
"""

import hashlib

import numpy as np
from mindspore import Tensor

from library.conditioning import encode_text
from library.data.cache import build_latent_cache, build_text_cache
from library.data.images import to_chw_float
from library.text import load_tokenizers, tokenize_chunks, tokenize_weighted
from library.training.distributed import all_reduce_sum


def model_identity(*cells):
    """16 hex digits of a SHA-256 over the cells' parameters (names, dtypes, shapes, bytes): the
    model part of a cache key. Hashing the SDXL VAE takes well under a second, the two text
    encoders a few seconds."""
    h = hashlib.sha256()
    for i, cell in enumerate(cells):
        for name, param in sorted(cell.parameters_and_names(), key=lambda kv: kv[0]):
            arr = np.ascontiguousarray(param.asnumpy())
            h.update(f"{i}:{name}:{arr.dtype.str}:{arr.shape};".encode())
            h.update(arr.tobytes())
    return h.hexdigest()[:16]


def latent_encoder(vae):
    """encode(images uint8 (B, H, W, 3), seeds) -> float32 (B, C, H/8, W/8): one sample of the
    VAE's latent distribution per image (kohya caches a sample, not the mean), unscaled. The
    noise of each image comes from numpy's default_rng(seed), so it is independent of batching."""
    def encode(batch, seeds):
        x = Tensor(np.stack([to_chw_float(im) for im in batch]))
        moments = vae.encode(x)
        c, h, w = moments.shape[1] // 2, moments.shape[2], moments.shape[3]
        noise = np.stack([np.random.default_rng(s).standard_normal((c, h, w), dtype=np.float32) for s in seeds])
        return vae.sample_latent(moments, Tensor(noise)).asnumpy().astype(np.float32)
    return encode


def text_encoder_fn(text_encoder1, text_encoder2, max_token_length=None, weighted=False):
    """encode(captions) -> (context float32 (B, L, C1 + C2), pooled float32 (B, P)), as the
    trainer encodes a batch (kohya's encode_tokens / encode_tokens_with_weights)."""
    tok1, tok2 = load_tokenizers()

    def encode(captions):
        if weighted:
            ids1, w1 = tokenize_weighted(tok1, captions, max_token_length)
            ids2, w2 = tokenize_weighted(tok2, captions, max_token_length)
            context, pooled = encode_text(text_encoder1, text_encoder2, ids1, ids2, w1, w2)
        else:
            context, pooled = encode_text(text_encoder1, text_encoder2, tokenize_chunks(tok1, captions, max_token_length),
                                          tokenize_chunks(tok2, captions, max_token_length))
        return context.asnumpy().astype(np.float32), pooled.asnumpy().astype(np.float32)
    return encode


class RankShare:
    """The data-parallel ranks as library/data/cache/exchange.py's `share` sees them."""

    def __init__(self, world):
        self.world = world
        self.rank, self.size, self.local_rank = world.rank, world.size, world.local_rank

    def all_reduce_sum(self, array):
        return all_reduce_sum(self.world, array)


def _share(world):
    return RankShare(world) if world is not None and world.distributed else None


def cache_latents(group, models, args, progress=True, world=None):
    """A LatentCache for `group` (call check_cache_options first). In RAM with --cache_latents,
    in npz files beside the images with --cache_latents_to_disk. world: the data-parallel
    World (library.training.distributed), None for one process."""
    return build_latent_cache(group, latent_encoder(models.vae), model_identity(models.vae),
                              to_disk=bool(args.cache_latents_to_disk), batch_size=getattr(args, "vae_batch_size", 1),
                              skip_cache_check=bool(getattr(args, "skip_cache_check", False)), progress=progress,
                              share=_share(world))


def cache_text_outputs(group, models, args, progress=True, world=None):
    """A TextCache for `group` (call check_cache_options first)."""
    mtl = getattr(args, "max_token_length", None)
    weighted = bool(getattr(args, "weighted_captions", False))
    return build_text_cache(group, text_encoder_fn(models.text_encoder1, models.text_encoder2, mtl, weighted),
                            model_identity(models.text_encoder1, models.text_encoder2), max_token_length=mtl,
                            weighted=weighted, to_disk=bool(args.cache_text_encoder_outputs_to_disk),
                            progress=progress, share=_share(world))
