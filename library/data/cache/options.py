"""kohya's cache options (--cache_latents[_to_disk], --cache_text_encoder_outputs[_to_disk],
--vae_batch_size, --skip_cache_check) and the rules that say which subsets can be cached."""

import logging

from library.errors import UserError

logger = logging.getLogger("library.data.cache")


def add_cache_arguments(parser):
    """kohya's caching options (train_util / sdxl_train_util), same names and defaults."""
    a = parser.add_argument
    a("--cache_latents", action="store_true", help="encode every image once with the VAE before training (RAM)")
    a("--cache_latents_to_disk", action="store_true",
      help="cache latents in <image>_<W>x<H>_sdxl.npz beside the images; implies --cache_latents")
    a("--vae_batch_size", type=int, default=1, help="images per VAE call when caching latents")
    a("--skip_cache_check", action="store_true",
      help="identify images by file size and modification time instead of hashing their bytes")
    a("--cache_text_encoder_outputs", action="store_true",
      help="encode every caption once before training; needs --network_train_unet_only")
    a("--cache_text_encoder_outputs_to_disk", action="store_true",
      help="cache text-encoder outputs in <image>_te_outputs.npz; implies --cache_text_encoder_outputs")
    a("--weighted_captions", action="store_true",
      help="read captions with A1111 attention syntax, (word:1.2), [word], as kohya's training does")


# kohya refuses these with a cached latent (train_network.py: is_latent_cacheable)
LATENT_CONFLICTS = ("color_aug", "random_crop")


def _text_conflicts(subset):
    """The caption keys of a subset that make its encoded caption change between samples.
    kohya checks the first four (is_text_encoder_output_cacheable); it silently ignores the
    last two, encoding a caption no sample would see, so they are errors here."""
    c = subset.caption
    found = []
    if c.shuffle_caption:
        found.append("shuffle_caption")
    if c.caption_dropout_rate > 0:
        found.append(f"caption_dropout_rate = {c.caption_dropout_rate}")
    if c.caption_tag_dropout_rate > 0:
        found.append(f"caption_tag_dropout_rate = {c.caption_tag_dropout_rate}")
    if c.token_warmup_step > 0:
        found.append(f"token_warmup_step = {c.token_warmup_step}")
    if c.caption_dropout_every_n_epochs > 0:
        found.append(f"caption_dropout_every_n_epochs = {c.caption_dropout_every_n_epochs}")
    if c.enable_wildcard:
        found.append("enable_wildcard")
    return found


def check_cache_options(args, groups):
    """kohya's caching rules, applied to `args` and the dataset groups (train, validation).

    `--cache_latents_to_disk` turns on `--cache_latents` and `--cache_text_encoder_outputs_to_disk`
    turns on `--cache_text_encoder_outputs`, as in kohya (args is updated). A combination that
    makes a cache meaningless is a UserError listing every subset and key at fault.
    """
    if args.cache_latents_to_disk and not args.cache_latents:
        logger.info("--cache_latents_to_disk is set, so --cache_latents is on too")
        args.cache_latents = True
    if args.cache_text_encoder_outputs_to_disk and not args.cache_text_encoder_outputs:
        logger.info("--cache_text_encoder_outputs_to_disk is set, so --cache_text_encoder_outputs is on too")
        args.cache_text_encoder_outputs = True
    if getattr(args, "vae_batch_size", 1) < 1:
        raise UserError(f"--vae_batch_size {args.vae_batch_size} must be at least 1")
    subsets = [s for g in groups if g is not None for ds in g.datasets for s in ds.config.subsets]
    errors = []
    if args.cache_latents:
        flag = "--cache_latents_to_disk" if args.cache_latents_to_disk else "--cache_latents"
        for s in subsets:
            bad = [k for k in LATENT_CONFLICTS if getattr(s, k)]
            if bad:
                errors.append(f"{s.where}: {' and '.join(bad)} cannot be used with {flag}: a cached latent is one "
                              f"fixed encoding of the image. Turn off {' and '.join(bad)}, or drop {flag}")
    if args.cache_text_encoder_outputs:
        flag = "--cache_text_encoder_outputs" + ("_to_disk" if args.cache_text_encoder_outputs_to_disk else "")
        if not getattr(args, "network_train_unet_only", False):
            errors.append(f"{flag} needs --network_train_unet_only: the text encoders' LoRA cannot be trained on "
                          f"cached text-encoder outputs")
        for s in subsets:
            bad = _text_conflicts(s)
            if bad:
                errors.append(f"{s.where}: {', '.join(bad)} cannot be used with {flag}: the caption must be the same "
                              f"in every epoch to be encoded once. Remove {'it' if len(bad) == 1 else 'them'}, or drop "
                              f"{flag}")
    if errors:
        raise UserError("conflicting cache options:\n  " + "\n  ".join(errors))
