"""SDXL's two CLIP tokenizers, built offline from the BPE files in configs/clip_tokenizer.

Both use the same vocabulary (49,408 tokens); they differ only in padding: tokenizer 1 pads with
EOS (49407) like OpenAI's CLIP, tokenizer 2 pads with id 0 ("!") like OpenCLIP, as kohya sets it.
"""

import logging
import os
from functools import lru_cache

import numpy as np

TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "configs", "clip_tokenizer")
MAX_LENGTH = 77
BOS_ID, EOS_ID = 49406, 49407


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
    length = token_length(max_token_length)
    ids = tokenize(tokenizer, texts, length)
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
