"""The latent and text-encoder output caches (--cache_latents[_to_disk],
--cache_text_encoder_outputs[_to_disk]), keyed by their inputs.

Plain numpy: the models come in as encode functions (library/training/cache_encoders.py builds
them from the MindSpore cells), so this module is testable without a model.

Every cache entry has a key: a JSON document of everything its value depends on.

    latents       the image file's content (SHA-256 of its bytes), its size, the bucket, the
                  resized size and the crop, the resize filter, flip_aug, alpha_mask, the mask
                  image's content (conditioning_data_dir), the VAE (a hash of its weights) and
                  this file format's version
    text outputs  the caption text as encoded (after prefix/suffix), --max_token_length,
                  --weighted_captions, the two text encoders (a hash of their weights), version

An entry's name inside a file is a hash of its key, and the whole key is stored next to the
arrays and compared on every read. So a changed input is a miss, never a stale hit (kohya's bug
#1771), and several entries for one image (two [[datasets]] at different resolutions) live side
by side. Files are written whole to a temporary name and renamed, so a half-written file is
never read; a file that cannot be read is reported with a warning and recomputed.

Data parallel (msrun): every rank builds the same list of entries to compute, in the same
order, and the encode batches are dealt round-robin: rank r encodes batches r, r + N, ... Each
batch's arrays then reach every rank through an AllReduce(sum) to which the other ranks add
zeros (exact: x + 0 = x), so each rank ends with the whole cache, as a single process would,
having encoded 1/N of it. This works in memory and across nodes with no shared disk. With
*_to_disk, an entry counts as cached only if it is valid on every rank, and the first worker of
each node writes the files (the same bytes, atomically, if nodes share the folder); the ranks
then wait for each other before reading.

Disk files sit beside the images, with kohya's names:

    <image stem>_<WWWW>x<HHHH>_sdxl.npz     latents; W x H is the image's size (kohya's scheme)
    <image stem>_te_outputs.npz             text-encoder outputs

Inside, per entry <id> (16 hex digits): `key_<id>` (the JSON key), `latents_<id>` float32
(4, h/8, w/8) unscaled, `latents_flipped_<id>` with flip_aug, `alpha_mask_<id>` float32 (h, w)
with alpha_mask or mask images; or `context_<id>` float32 (L, 2048) and `pooled_<id>` float32
(1280,). When a run rewrites a file, it keeps only the entries that run uses, so stale entries
do not pile up.

The package: options.py (kohya's cache options and their rules), keys.py (what an entry depends
on, and the file names), files.py (the npz format, read lazily, written atomically), exchange.py
(the data-parallel share: one rank encodes, all receive), latents.py and texts.py (the caches and
the builders that fill them). The names the trainer, tools and tests use are exported here.
"""

from library.data.cache.files import read_cache_file, write_cache_file
from library.data.cache.keys import latents_path, text_path
from library.data.cache.latents import build_latent_cache
from library.data.cache.options import add_cache_arguments, check_cache_options
from library.data.cache.texts import build_text_cache

__all__ = ["read_cache_file", "write_cache_file", "latents_path", "text_path", "build_latent_cache",
           "add_cache_arguments", "check_cache_options", "build_text_cache"]
