"""Captions: reading them from caption files and metadata, and kohya's per-sample processing.

`process_caption` reproduces kohya's BaseDataset.process_caption step for step, including the
order in which it draws random numbers, so seeding a `random.Random(s)` gives exactly the
output kohya gives after `random.seed(s)` (tests/test_data_captions.py checks this against
values produced by kohya's code). The RNG is passed in; no global random state is touched.
"""

import math
import os
import re
from dataclasses import dataclass

from library.errors import UserError


@dataclass(frozen=True)
class CaptionOptions:
    """The caption keys of one subset, after kohya's precedence has resolved them."""

    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: str = None
    enable_wildcard: bool = False
    caption_prefix: str = None
    caption_suffix: str = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0

    def is_static(self):
        """True when processing cannot change between epochs, so a text-encoder output cache is
        valid (kohya's is_text_encoder_output_cacheable, without dropout support)."""
        return not (self.caption_dropout_rate > 0 or self.shuffle_caption or self.token_warmup_step > 0
                    or self.caption_tag_dropout_rate > 0 or self.caption_dropout_every_n_epochs > 0
                    or self.enable_wildcard)


def _warmup_steps(opts, max_train_steps):
    # kohya overwrites a value below 1 with floor(value * max_train_steps) on first use
    if opts.token_warmup_step < 1:
        return math.floor(opts.token_warmup_step * max_train_steps)
    return opts.token_warmup_step


def _expand_wildcards(caption, rng):
    if "\n" in caption:
        caption = rng.choice(caption.split("\n"))
    # protect the `{{` / `}}` escapes with markers that cannot occur in the caption
    open_mark, close_mark = "⦅", "⦆"
    while open_mark in caption or close_mark in caption:
        open_mark += "⦅"
        close_mark += "⦆"
    caption = caption.replace("{{", open_mark).replace("}}", close_mark)
    caption = re.sub(r"\{([^}]+)\}", lambda m: rng.choice(m.group(1).split("|")), caption)
    return caption.replace(open_mark, "{").replace(close_mark, "}")


def _split_tags(caption, opts):
    """(fixed, flex, fixed_suffix) tag lists, kohya's way."""
    sep = opts.caption_separator
    if opts.keep_tokens_separator and opts.keep_tokens_separator in caption:
        fixed_part, flex_part = caption.split(opts.keep_tokens_separator, 1)
        suffix = []
        if opts.keep_tokens_separator in flex_part:
            flex_part, suffix_part = flex_part.split(opts.keep_tokens_separator, 1)
            suffix = [t.strip() for t in suffix_part.split(sep) if t.strip()]
        fixed = [t.strip() for t in fixed_part.split(sep) if t.strip()]
        flex = [t.strip() for t in flex_part.split(sep) if t.strip()]
        return fixed, flex, suffix
    # this path keeps empty tags, as kohya does
    tags = [t.strip() for t in caption.strip().split(sep)]
    if opts.keep_tokens > 0:
        return tags[:opts.keep_tokens], tags[opts.keep_tokens:], []
    return [], tags, []


def process_caption(caption, opts, rng, epoch=1, step=0, max_train_steps=0):
    """One sample's caption as kohya's BaseDataset.process_caption makes it.

    epoch is 1-based, as kohya's trainer sets it (so caption_dropout_every_n_epochs = 2 drops
    every caption in epochs 2, 4, ...); step and max_train_steps drive token warmup.
    """
    if opts.caption_prefix:
        caption = opts.caption_prefix + " " + caption
    if opts.caption_suffix:
        caption = caption + " " + opts.caption_suffix

    dropped = opts.caption_dropout_rate > 0 and rng.random() < opts.caption_dropout_rate
    dropped = dropped or (opts.caption_dropout_every_n_epochs > 0 and epoch % opts.caption_dropout_every_n_epochs == 0)
    if dropped:
        return ""

    if opts.enable_wildcard:
        caption = _expand_wildcards(caption, rng)
    else:
        caption = caption.split("\n")[0]

    warmup = _warmup_steps(opts, max_train_steps)
    if opts.shuffle_caption or opts.token_warmup_step > 0 or opts.caption_tag_dropout_rate > 0:
        fixed, flex, suffix = _split_tags(caption, opts)
        if warmup and step < warmup:
            keep = math.floor(step * ((len(flex) - opts.token_warmup_min) / warmup)) + opts.token_warmup_min
            flex = flex[:keep]
        if opts.shuffle_caption:
            rng.shuffle(flex)
        if opts.caption_tag_dropout_rate > 0:
            flex = [t for t in flex if rng.random() >= opts.caption_tag_dropout_rate]
        # always ", ", whatever caption_separator is (kohya's behaviour)
        caption = ", ".join(fixed + flex + suffix)

    if opts.secondary_separator:
        caption = caption.replace(opts.secondary_separator, opts.caption_separator)
    return caption


def caption_file_candidates(image_path, extension):
    """Kohya's candidates: `stem + ext`, then, for face-crop names `name_cx_cy_w_h`, `name + ext`."""
    stem = os.path.splitext(image_path)[0]
    tokens = stem.split("_")
    candidates = [stem + extension]
    if len(tokens) >= 5:
        candidates.append("_".join(tokens[:-4]) + extension)
    return candidates


def read_caption_file(image_path, extension, enable_wildcard):
    """The caption for `image_path` from its caption file, or None when there is none.

    Without wildcards only the first line is used; with them every non-empty line is kept (one
    is picked per sample).
    """
    for path in caption_file_candidates(image_path, extension):
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8-sig") as f:    # -sig: no BOM in the caption
                lines = f.readlines()
        except UnicodeDecodeError:
            raise UserError(f"caption file {path} is not UTF-8 text; re-save it as UTF-8") from None
        if not any(line.strip() for line in lines):     # whitespace only is empty too
            raise UserError(f"caption file {path} is empty; write a caption or delete the file")
        if enable_wildcard:
            return "\n".join(line.strip() for line in lines if line.strip())
        return lines[0].strip()
    return None


def metadata_caption(entry, separator, enable_wildcard):
    """Kohya's fine-tuning caption: `caption` + separator + `tags` (either may be missing); with
    wildcards, the tags are appended to every caption line."""
    caption = entry.get("caption") or ""
    tags = entry.get("tags")
    if enable_wildcard:
        if tags is not None:
            tags = tags.replace("\n", separator)
            caption = "\n".join(f"{line}{separator}{tags}" for line in caption.split("\n") if line.strip())
        return caption
    if tags:
        caption = caption + separator + tags if caption else tags
    return caption


def metadata_tags(entry, separator, enable_wildcard):
    """The `tags` of a metadata entry as kohya counts them for ss_tag_frequency, or None when it
    counts nothing: with wildcards every tags value (newlines turned into the separator), else
    only non-empty ones."""
    tags = entry.get("tags")
    if enable_wildcard:
        return None if tags is None else tags.replace("\n", separator)
    return tags if tags else None
