"""SDXL text conditioning against kohya's own code (SdxlTokenizeStrategy + SdxlTextEncodingStrategy
run on the same tiny text encoders; values in tests/fixtures/kohya_golden/text_conditioning.npz)."""

import numpy as np
import pytest

from library.conditioning import encode_text
from library.text import load_tokenizers, tokenize_chunks
from conftest import FIXTURES


@pytest.fixture(scope="module")
def golden():
    return np.load(FIXTURES / "kohya_golden" / "text_conditioning.npz")


@pytest.mark.parametrize("max_token_length", [None, 150, 225])
def test_token_chunks_match_kohya(golden, max_token_length):
    tok1, tok2 = load_tokenizers()
    texts = [str(t) for t in golden["texts"]]
    key = f"mtl{max_token_length or 0}"
    assert np.array_equal(tokenize_chunks(tok1, texts, max_token_length), golden[f"{key}_ids1"])
    assert np.array_equal(tokenize_chunks(tok2, texts, max_token_length), golden[f"{key}_ids2"])


@pytest.mark.parametrize("max_token_length", [None, 150, 225])
def test_context_and_pooled_match_kohya(golden, tiny_models, max_token_length):
    key = f"mtl{max_token_length or 0}"
    context, pooled = encode_text(tiny_models.text_encoder1, tiny_models.text_encoder2,
                                  golden[f"{key}_ids1"], golden[f"{key}_ids2"])
    for ours, ref in ((context, golden[f"{key}_context"]), (pooled, golden[f"{key}_pooled"])):
        ours = ours.asnumpy()
        assert ours.shape == ref.shape
        assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-4


def test_long_caption_is_cut_at_the_chunk_budget():
    tok1, _ = load_tokenizers()
    ids = tokenize_chunks(tok1, ["word " * 400], 150)
    assert ids.shape == (1, 2, 77)
    assert (ids[:, :, 0] == 49406).all() and (ids[:, :, -1] == 49407).all()


def test_unsupported_token_length_is_refused():
    tok1, _ = load_tokenizers()
    with pytest.raises(ValueError, match="75, 150 or 225"):
        tokenize_chunks(tok1, ["x"], 100)
