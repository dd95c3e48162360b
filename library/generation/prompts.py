"""kohya's prompt syntax for sdxl_gen_img: prompt files, in-prompt options, (word:1.2) weighting,
and the generator's long-prompt token chunks with per-token weights.

Plain Python and numpy. kohya's rules are kept exactly where a line means something to kohya;
where kohya silently ignores or half-reads something (an unknown `--x`, `--w 512px`, a weight that
is not a number), this module raises a UserError naming the file and line instead.
"""

import logging
import re
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np

from library.errors import UserError, read_utf8
from library.text import parse_prompt_attention

logger = logging.getLogger(__name__)

# The image size when neither the command line nor the prompt gives one, for generated images and
# training samples alike (kohya's training samples use 512, which SDXL renders badly).
DEFAULT_SIZE = 1024
CHUNK = 77          # tokens one CLIP call sees: BOS, 75 prompt tokens, EOS
CHUNK_TOKENS = CHUNK - 2

# ---------------------------------------------------------------------------------------------
# Prompt lines and in-prompt options (sdxl_gen_img.py:2477-2701, 1921-1925)


@dataclass
class PromptLine:
    """One prompt with the options given on its line; None means "use the command-line value".

    seeds: one per image of this prompt; when there are fewer seeds than images the last one is
    reused (kohya pops them per image and keeps the previous seed when the list runs out).
    network_muls: per-LoRA multipliers; kohya pads a short list with its last value.
    """
    prompt: str
    negative_prompt: str = ""
    width: Optional[int] = None
    height: Optional[int] = None
    original_width: Optional[int] = None
    original_height: Optional[int] = None
    original_width_negative: Optional[int] = None
    original_height_negative: Optional[int] = None
    crop_top: Optional[int] = None
    crop_left: Optional[int] = None
    steps: Optional[int] = None
    seeds: Optional[List[int]] = None
    scale: Optional[float] = None
    strength: Optional[float] = None
    clip_prompt: Optional[str] = None
    network_muls: Optional[List[float]] = None
    raw: str = field(default="", repr=False)  # the line as written: kohya's `raw-prompt` PNG key


_INT = (r"\d+", int)
_FLOAT = (r"[\d.]+", float)  # kohya's patterns take no sign and no exponent
_TEXT = (r".+", str)
# kohya's option name -> (PromptLine field, value pattern, converter). Checked in kohya's order, so
# that e.g. `nw` is tried before `n`.
_OPTIONS = {
    "w": ("width",) + _INT, "h": ("height",) + _INT,
    "ow": ("original_width",) + _INT, "oh": ("original_height",) + _INT,
    "nw": ("original_width_negative",) + _INT, "nh": ("original_height_negative",) + _INT,
    "ct": ("crop_top",) + _INT, "cl": ("crop_left",) + _INT,
    "s": ("steps", r"\d+", lambda v: max(1, min(1000, int(v)))),  # kohya clamps steps to 1..1000
    "d": ("seeds", r"[\d,]+", lambda v: [int(d) for d in v.split(",")]),
    "l": ("scale",) + _FLOAT,
    "t": ("strength",) + _FLOAT,
    "n": ("negative_prompt",) + _TEXT,
    "c": ("clip_prompt",) + _TEXT,
    "am": ("network_muls", r"[\d.\-,]+", lambda v: [float(m) for m in v.split(",")]),
}
# Options kohya reads that this port does not implement: named in the error rather than ignored.
_UNSUPPORTED = {
    "nl": "negative scale (broken in kohya's sdxl_gen_img)",
    **{k: "Deep Shrink" for k in ("dsd1", "dst1", "dsd2", "dst2", "dsr")},
    **{k: "Gradual Latent" for k in ("glt", "glr", "gle", "gls", "glsn", "glus")},
}
# kohya's dynamic-prompt pattern ({a|b}, {2$$a|b}, {e$$a|b}; sdxl_gen_img.py:1341): any match is
# expanded there, so a prompt that matches cannot be passed through unchanged.
_DYNAMIC = re.compile(r"\{((e|E)\$\$)?(([\d\-]+)\$\$)?(([^\|\}]+?)\$\$)?(.+?((\|).+?)*?)\}")


def parse_line_options(raw, options, where, unsupported=None):
    """kohya's in-prompt option syntax, shared by generator prompts and training samples: the
    text, then options each introduced by " --" (kohya splits on exactly that), names matched
    case-insensitively. `options` maps a name to (field, value pattern, converter); returns
    (text, {field: value}). `unsupported` maps names kohya reads and this port refuses to why."""
    unsupported = unsupported or {}
    parts = raw.strip().split(" --")
    values = {}
    for part in parts[1:]:
        name, _, value = part.partition(" ")
        key = name.lower()
        if key in unsupported:
            raise UserError(f"{where}: in-prompt option --{name} ({unsupported[key]}) is not supported")
        if key not in options:
            raise UserError(f"{where}: unknown in-prompt option --{name}; "
                            f"known: {', '.join('--' + k for k in options)}")
        field_name, pattern, convert = options[key]
        # Text options keep their value verbatim (kohya's `(.+)`); others may not carry trailing
        # junk, which kohya's prefix match would silently drop (`--w 512px` -> 512).
        value = value if pattern == r".+" else value.rstrip()
        if not re.fullmatch(pattern, value):
            raise UserError(f"{where}: bad value for --{name}: {value!r}")
        try:
            values[field_name] = convert(value)
        except ValueError:
            raise UserError(f"{where}: bad value for --{name}: {value!r}") from None
    return parts[0], values


def parse_prompt_line(raw, where="prompt"):
    """A PromptLine from one generator prompt line. `where` names the line in errors ("file.txt:3")."""
    if _DYNAMIC.search(raw):
        raise UserError(f"{where}: dynamic prompts ({{a|b}}) are not supported: {raw.strip()!r}")
    text, values = parse_line_options(raw, _OPTIONS, where, _UNSUPPORTED)
    return PromptLine(prompt=text, raw=raw, **values)


def read_prompt_file(path):
    """The PromptLines of a prompt file. As kohya: UTF-8, one prompt per line; blank lines and
    lines whose first character is '#' are skipped (an indented '#' is a prompt)."""
    text = read_utf8(path, "prompt file")
    return [parse_prompt_line(line, f"{path}:{number}")
            for number, line in enumerate(text.splitlines(), 1)
            if line.strip() and line[0] != "#"]


def seed_for_image(seeds, index):
    """The seed of image `index` of a prompt whose line gave `seeds` (the last is reused)."""
    return seeds[min(index, len(seeds) - 1)]


# ---------------------------------------------------------------------------------------------
# Weighting: (a), (a:1.3), [a], escapes, BREAK (the parser is library/text.py's)


def prompt_tokens(tokenizer, text, max_tokens):
    """Token ids (no BOS/EOS) and one weight per token, at most max_tokens of them.

    Each weighted piece is tokenized on its own, as kohya does, so "(red) car" gives the tokens of
    "red" and " car" separately. BREAK pads with the pad token up to the next multiple of 77 (kohya
    counts 77 here although chunks hold 75 prompt tokens; kept for identical output).
    """
    ids, weights = [], []
    for piece, weight in parse_prompt_attention(text, breaks=True):
        if piece.strip() == "BREAK":
            pad = CHUNK - len(ids) % CHUNK
            ids += [tokenizer.pad_token_id] * pad
            weights += [1.0] * pad
            continue
        piece_ids = tokenizer(piece).input_ids[1:-1]
        ids += piece_ids
        weights += [weight] * len(piece_ids)
        if len(ids) > max_tokens:
            break
    if len(ids) > max_tokens:
        logger.warning("prompt truncated to %d tokens; shorten it or raise --max_embeddings_multiples: %r",
                       max_tokens, text)
    return ids[:max_tokens], weights[:max_tokens]


# ---------------------------------------------------------------------------------------------
# Long prompts: 77-token chunks, each with its own BOS and EOS (sdxl_gen_img.py:1127-1307)

def _chunks(tokenizer, ids, n):
    """(n, 77) token ids: BOS + ids + EOS + padding laid out over n chunks of 75, each chunk
    wrapped in its own BOS and EOS the way kohya patches them."""
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    flat = [bos] + ids + [eos] + [pad] * (CHUNK_TOKENS * n - len(ids))
    chunks = np.array([flat[i * CHUNK_TOKENS: i * CHUNK_TOKENS + CHUNK] for i in range(n)], dtype=np.int64)
    chunks[:, 0] = bos
    if pad == eos:  # tokenizer 1: every chunk ends in EOS
        chunks[:, -1] = eos
    else:           # tokenizer 2 pads with "!": end a chunk that ends mid-prompt; a chunk of
        chunks[(chunks[:, -1] != eos) & (chunks[:, -1] != pad), -1] = eos  # nothing but padding
        chunks[chunks[:, 1] == pad, 1] = eos                               # gets an EOS after BOS
    return chunks


def _chunk_weights(weights, n):
    """(n * 77,) weights aligned with _chunks: 1.0 at each BOS/EOS and after the prompt."""
    if not weights:
        return np.ones(n * CHUNK)
    out = []
    for i in range(n):
        out += [1.0] + weights[i * CHUNK_TOKENS: (i + 1) * CHUNK_TOKENS] + [1.0]
    return np.array(out + [1.0] * (n * CHUNK - len(out)))


@dataclass
class TextPlan:
    """What one tokenizer's text encoder must run for a batch of prompts (and their negatives).

    tokens: (B, n, 77) int64 chunks; encode each chunk, keep hidden_states[-2], and concatenate the
    chunks into (B, 77n, C). weights: (B, 77n) for `weighted_embeddings`. The pooled output (text
    encoder 2) comes from chunk 0. uncond_*: the same for the negative prompts, or None without CFG.
    """
    tokens: np.ndarray
    weights: np.ndarray
    uncond_tokens: Optional[np.ndarray]
    uncond_weights: Optional[np.ndarray]


def text_plan(tokenizer, prompts, negative_prompts=None, max_embeddings_multiples=1):
    """kohya's get_weighted_text_embeddings up to the encoder call, for one tokenizer.

    The number of chunks n is the fewest that hold the longest prompt or negative prompt of the batch
    (negatives count only when given, i.e. with CFG), capped by max_embeddings_multiples.
    """
    for p in list(prompts) + list(negative_prompts or []):
        if " AND " in p:
            raise UserError(f"regional prompts (' AND ') are not supported: {p!r}")
    limit = CHUNK_TOKENS * max_embeddings_multiples
    cond = [prompt_tokens(tokenizer, p, limit) for p in prompts]
    uncond = [prompt_tokens(tokenizer, p, limit) for p in negative_prompts] if negative_prompts is not None else []
    longest = max(len(ids) for ids, _ in cond + uncond)
    n = max(1, min(max_embeddings_multiples, (longest - 1) // CHUNK_TOKENS + 1))

    def stack(pairs):
        return (np.stack([_chunks(tokenizer, ids, n) for ids, _ in pairs]),
                np.stack([_chunk_weights(w, n) for _, w in pairs]))

    tokens, weights = stack(cond)
    uncond_tokens, uncond_weights = stack(uncond) if negative_prompts is not None else (None, None)
    return TextPlan(tokens, weights, uncond_tokens, uncond_weights)


def weighted_embeddings(embeddings, weights):
    """Scale each token's embedding by its weight, then rescale each prompt so the mean over tokens
    and channels is what it was (kohya's generator does this; its training does not)."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    before = embeddings.mean(axis=(-2, -1), keepdims=True)
    weighted = embeddings * np.asarray(weights, dtype=np.float32)[..., None]
    return weighted * (before / weighted.mean(axis=(-2, -1), keepdims=True))
