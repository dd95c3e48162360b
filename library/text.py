"""SDXL's two CLIP tokenizers, built offline from the BPE files in configs/clip_tokenizer.

Both use the same vocabulary (49,408 tokens); they differ only in padding: tokenizer 1 pads with
EOS (49407) like OpenAI's CLIP, tokenizer 2 pads with id 0 ("!") like OpenCLIP, as kohya sets it.
"""

import logging
import os
import re
from functools import lru_cache

import numpy as np

from library.errors import UserError

TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "configs", "clip_tokenizer")
MAX_LENGTH = 77
BOS_ID, EOS_ID = 49406, 49407

logger = logging.getLogger(__name__)


@lru_cache(maxsize=None)
def load_tokenizers():
    """(tokenizer1, tokenizer2) as transformers CLIPTokenizers with model_max_length 77."""
    # transformers announces at import that it found no PyTorch; it needs none for tokenizers.
    logging.getLogger("transformers").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers import CLIPTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()

    files = dict(vocab_file=os.path.join(TOKENIZER_DIR, "vocab.json"),
                 merges_file=os.path.join(TOKENIZER_DIR, "merges.txt"),
                 model_max_length=MAX_LENGTH)
    tokenizer2 = CLIPTokenizer(**files)
    # kohya sets the pad id on a plain tokenizer rather than declaring "!" as the pad token, so
    # a literal "!" in a caption stays token 256 (declared special, it would become id 0).
    tokenizer2.pad_token_id = 0
    return CLIPTokenizer(**files), tokenizer2


def tokenize(tokenizer, texts, length=MAX_LENGTH):
    """Token ids (B, length) as a numpy int32 array: BOS, tokens, EOS, then padding; truncated."""
    out = tokenizer(list(texts), padding="max_length", truncation=True, max_length=length,
                    return_tensors="np")
    return out["input_ids"].astype(np.int32)


def token_length(max_token_length):
    """Tokenized length kohya uses: 77, or --max_token_length (75/150/225) + 2."""
    if max_token_length is None:
        return MAX_LENGTH
    if max_token_length not in (75, 150, 225):
        raise ValueError(f"max_token_length must be 75, 150 or 225, not {max_token_length}")
    return max_token_length + 2


def tokenize_chunks(tokenizer, texts, max_token_length=None):
    """Token ids (B, n, 77) as kohya trains: n = 1, or max_token_length / 75 chunks of
    BOS + 75 tokens + EOS/PAD cut from one tokenization of length 75n + 2.

    A tokenizer that pads with something other than EOS (tokenizer 2) gets kohya's fix-ups: a
    chunk whose last real token is cut off ends in EOS, and an empty chunk starts BOS, EOS.
    """
    return _chunk(tokenizer, tokenize(tokenizer, texts, token_length(max_token_length)))


def _chunk(tokenizer, ids):
    """(B, 75n + 2) ids -> (B, n, 77) chunks, with kohya's fix-ups for a non-EOS pad."""
    length = ids.shape[1]
    if length == MAX_LENGTH:
        return ids[:, None, :]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    chunks = []
    for start in range(1, length - MAX_LENGTH + 2, MAX_LENGTH - 2):
        chunk = np.concatenate([ids[:, :1], ids[:, start:start + MAX_LENGTH - 2], ids[:, -1:]], 1)
        if pad != eos:
            cut_off = (chunk[:, -2] != eos) & (chunk[:, -2] != pad)
            chunk[cut_off, -1] = eos
            chunk[chunk[:, 1] == pad, 1] = eos
        chunks.append(chunk)
    return np.stack(chunks, axis=1)


# ------------------------------------------------------------------------- weighted captions
# A1111's attention syntax, one parser for both of kohya's readers: the trainer's weighted
# captions (strategy_base.TokenizeStrategy._get_weighted_input_ids.parse_prompt_attention) and
# the generator's prompts (sdxl_gen_img.py:942-1049), which add BREAK.
_RE_ATTENTION = re.compile(r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|     # escaped brackets and backslashes, or a lone backslash
\(|\[|                          # openers
:([+-]?[.\d]+)\)|               # ':weight)' closes a round bracket with an explicit weight
\)|]|                           # closers
[^\\()\[\]:]+|                  # plain text
:                               # a colon that is not a weight
""", re.X)
ROUND, SQUARE = 1.1, 1 / 1.1


def parse_prompt_attention(text, breaks=False):
    """[[text, weight], ...] for A1111 attention syntax: `(x)` multiplies by 1.1, `[x]` divides
    by 1.1, `(x:w)` multiplies by w, nested brackets multiply, unclosed brackets apply to the rest,
    unmatched closers are text, `\\(` `\\)` `\\[` `\\]` `\\\\` are literals, and runs of equal
    weight are merged. With `breaks` (the generator's syntax) BREAK stays a piece of its own.

    >>> parse_prompt_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")[:2]
    [['a ', 1.0], ['house', 1.5730000000000004]]
    """
    pieces, round_open, square_open = [], [], []

    def scale_from(start, factor):
        for piece in pieces[start:]:
            piece[1] *= factor

    for m in _RE_ATTENTION.finditer(text.replace("BREAK", "\\BREAK\\") if breaks else text):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(pieces))
        elif token == "[":
            square_open.append(len(pieces))
        elif weight is not None and round_open:
            try:
                scale_from(round_open.pop(), float(weight))
            except ValueError:  # the pattern admits "1.2.3", which kohya then crashes on
                raise UserError(f"bad prompt weight {weight!r} in {text!r}") from None
        elif token == ")" and round_open:
            scale_from(round_open.pop(), ROUND)
        elif token == "]" and square_open:
            scale_from(square_open.pop(), SQUARE)
        else:
            pieces.append([token, 1.0])
    for start in round_open:
        scale_from(start, ROUND)
    for start in square_open:
        scale_from(start, SQUARE)

    merged = []
    for piece in pieces or [["", 1.0]]:
        if merged and merged[-1][1] == piece[1] and not (
                breaks and "BREAK" in (merged[-1][0].strip(), piece[0].strip())):
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return merged


def _weighted_ids(tokenizer, text, length):
    """One caption -> (ids, weights) of `length`: BOS, the tokens of each weighted piece
    (tokenized separately, as kohya does), EOS, padding; weight 1.0 on the special tokens."""
    budget = length - 2
    tokens, weights = [], []
    for piece, weight in parse_prompt_attention(text):
        piece_tokens = tokenizer(piece).input_ids[1:-1]
        tokens += piece_tokens
        weights += [weight] * len(piece_tokens)
        if len(tokens) > budget:
            break
    if len(tokens) > budget:
        logger.warning("weighted caption truncated to %d tokens (raise --max_token_length): %.60s...", budget, text)
        tokens, weights = tokens[:budget], weights[:budget]
    ids = [tokenizer.bos_token_id] + tokens + [tokenizer.eos_token_id] + [tokenizer.pad_token_id] * (budget - len(tokens))
    weights = [1.0] + weights + [1.0] * (length - 1 - len(weights))
    return ids, weights


def tokenize_weighted(tokenizer, texts, max_token_length=None):
    """kohya's tokenize_with_weights for one tokenizer: (ids (B, n, 77) int32, weights (B, n, 77)
    float32). The ids are chunked like `tokenize_chunks` (with the same fix-ups); each chunk's
    weights are 1.0 at its first and last position and the pieces' weights between."""
    length = token_length(max_token_length)
    pairs = [_weighted_ids(tokenizer, t, length) for t in texts]
    ids = _chunk(tokenizer, np.array([p[0] for p in pairs], dtype=np.int32).reshape(len(pairs), length))
    flat = np.array([p[1] for p in pairs], dtype=np.float32).reshape(len(pairs), length)
    n = ids.shape[1]
    if n == 1:
        return ids, flat[:, None, :]
    weights = np.ones(ids.shape, np.float32)
    for k in range(n):
        weights[:, k, 1:MAX_LENGTH - 1] = flat[:, 1 + k * (MAX_LENGTH - 2):1 + (k + 1) * (MAX_LENGTH - 2)]
    return ids, weights
