"""--weighted_captions against kohya's own code: SdxlTokenizeStrategy.tokenize_with_weights and
SdxlTextEncodingStrategy.encode_tokens_with_weights, run on the same tiny text encoders (values in
tests/fixtures/kohya_golden/text_weighted.npz; the scratch driver is described in docs/dataset.md)."""

import numpy as np
import pytest

from library.conditioning import encode_text, merge_weights
from library.text import load_tokenizers, parse_prompt_attention, tokenize_chunks, tokenize_weighted
from conftest import FIXTURES


@pytest.fixture(scope="module")
def golden():
    return np.load(FIXTURES / "kohya_golden" / "text_weighted.npz")


@pytest.mark.parametrize("max_token_length", [None, 150, 225])
def test_weighted_ids_and_weights_match_kohya(golden, max_token_length):
    tok1, tok2 = load_tokenizers()
    texts = [str(t) for t in golden["texts"]]
    key = f"mtl{max_token_length or 0}"
    for tok, n in ((tok1, "1"), (tok2, "2")):
        ids, weights = tokenize_weighted(tok, texts, max_token_length)
        assert ids.dtype == np.int32 and weights.dtype == np.float32
        assert np.array_equal(ids, golden[f"{key}_ids{n}"])
        assert np.array_equal(weights, golden[f"{key}_weights{n}"])


@pytest.mark.parametrize("max_token_length", [None, 150, 225])
def test_weighted_context_matches_kohya(golden, tiny_models, max_token_length):
    key = f"mtl{max_token_length or 0}"
    rows = golden[f"{key}_context_rows"]
    context, pooled = encode_text(tiny_models.text_encoder1, tiny_models.text_encoder2,
                                  golden[f"{key}_ids1"][rows], golden[f"{key}_ids2"][rows],
                                  golden[f"{key}_weights1"][rows], golden[f"{key}_weights2"][rows])
    for ours, ref in ((context, golden[f"{key}_context"]), (pooled, golden[f"{key}_pooled"])):
        ours = ours.asnumpy()
        assert ours.shape == ref.shape
        assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-4


def test_parser_matches_a1111_examples():
    # the examples in kohya's (and A1111's) docstring
    assert parse_prompt_attention("normal text") == [["normal text", 1.0]]
    assert parse_prompt_attention("an (important) word") == [["an ", 1.0], ["important", 1.1], [" word", 1.0]]
    assert parse_prompt_attention("(unbalanced") == [["unbalanced", 1.1]]
    assert parse_prompt_attention(r"\(literal\]") == [["(literal]", 1.0]]
    assert parse_prompt_attention("(unnecessary)(parens)") == [["unnecessaryparens", 1.1]]
    assert parse_prompt_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).") == [
        ["a ", 1.0], ["house", 1.5730000000000004], [" ", 1.1], ["on", 1.0], [" a ", 1.1], ["hill", 0.55],
        [", sun, ", 1.1], ["sky", 1.4641000000000006], [".", 1.1]]


def test_plain_caption_tokenizes_as_unweighted():
    tok1, tok2 = load_tokenizers()
    text = ["a photo of a red fox, " * 20]
    for tok in (tok1, tok2):
        for mtl in (None, 150):
            ids, weights = tokenize_weighted(tok, text, mtl)
            assert np.array_equal(ids, tokenize_chunks(tok, text, mtl))
            assert (weights == 1.0).all()


def test_merged_weights_follow_kohya_slices():
    w = np.arange(2 * 3 * 77, dtype=np.float32).reshape(2, 3, 77)
    merged = merge_weights(w)
    assert merged.shape == (2, 227)
    assert (merged[:, 0] == 1).all() and (merged[:, -1] == 1).all()
    for i in range(3):
        assert np.array_equal(merged[:, i * 75 + 1:i * 75 + 76], w[:, i, 1:-1])
    assert np.array_equal(merge_weights(w[:, :1]), w[:, 0])
