"""SDXL's two CLIP tokenizers, built offline from the BPE files in configs/clip_tokenizer.

Both use the same vocabulary (49,408 tokens); they differ only in padding: tokenizer 1 pads with
EOS (49407) like OpenAI's CLIP, tokenizer 2 pads with id 0 ("!") like OpenCLIP, as kohya sets it.
"""

import logging
import os
import re
from functools import lru_cache

import numpy as np

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
# A1111's attention syntax, as kohya's training parser (strategy_base.TokenizeStrategy
# ._get_weighted_input_ids.parse_prompt_attention) reads it.
_RE_ATTENTION = re.compile(r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:([+-]?[.\d]+)\)|
\)|
]|
[^\\()\[\]:]+|
:
""", re.X)


def parse_prompt_attention(text):
    """[[text, weight], ...] for A1111 attention syntax: `(x)` multiplies by 1.1, `[x]` divides
    by 1.1, `(x:w)` multiplies by w, `\\(` `\\)` `\\[` `\\]` `\\\\` are literals; unclosed
    brackets still apply to the rest, and runs of equal weight are merged.

    >>> parse_prompt_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")[:2]
    [['a ', 1.0], ['house', 1.5730000000000004]]
    """
    res, round_brackets, square_brackets = [], [], []

    def multiply_range(start, multiplier):
        for p in range(start, len(res)):
            res[p][1] *= multiplier

    for m in _RE_ATTENTION.finditer(text):
        piece, weight = m.group(0), m.group(1)
        if piece.startswith("\\"):
            res.append([piece[1:], 1.0])
        elif piece == "(":
            round_brackets.append(len(res))
        elif piece == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            multiply_range(round_brackets.pop(), float(weight))
        elif piece == ")" and round_brackets:
            multiply_range(round_brackets.pop(), 1.1)
        elif piece == "]" and square_brackets:
            multiply_range(square_brackets.pop(), 1 / 1.1)
        else:
            res.append([piece, 1.0])
    for pos in round_brackets:
        multiply_range(pos, 1.1)
    for pos in square_brackets:
        multiply_range(pos, 1 / 1.1)
    if not res:
        res = [["", 1.0]]
    i = 0
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return res


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
