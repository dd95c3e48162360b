"""SDXL's two CLIP tokenizers, built offline from the BPE files in configs/clip_tokenizer.

Both use the same vocabulary (49,408 tokens); they differ only in padding: tokenizer 1 pads with
EOS (49407) like OpenAI's CLIP, tokenizer 2 pads with "!" (id 0) like OpenCLIP, as kohya sets it.
"""

import logging
import os
from functools import lru_cache

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
    return CLIPTokenizer(**files), CLIPTokenizer(**files, pad_token="!")


def tokenize(tokenizer, texts, length=MAX_LENGTH):
    """Token ids (B, length) as a numpy int32 array: BOS, tokens, EOS, then padding; truncated."""
    import numpy as np
    out = tokenizer(list(texts), padding="max_length", truncation=True, max_length=length,
                    return_tensors="np")
    return out["input_ids"].astype(np.int32)
