"""Prompt lines, weighting and long-prompt chunks against kohya's own functions.

Golden values: tests/fixtures/gen_golden/prompts.json, made by running sdxl_gen_img.py's functions
(and its in-prompt option loop, verbatim) on the project's tokenizers; its `_source` says how.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from library.errors import UserError
from library.generation import prompts
from library.text import load_tokenizers, parse_prompt_attention

GOLDEN = json.loads((Path(__file__).parent / "fixtures" / "gen_golden" / "prompts.json").read_text())
TABLE = np.random.default_rng(0).standard_normal((49408, 8)).astype(np.float32)


@pytest.mark.parametrize("text,expected", GOLDEN["attention"], ids=[a[0] or "empty" for a in GOLDEN["attention"]])
def test_attention_parsing_matches_kohya(text, expected):
    got = parse_prompt_attention(text, breaks=True)
    assert [t for t, _ in got] == [t for t, _ in expected]
    np.testing.assert_allclose([w for _, w in got], [w for _, w in expected], rtol=1e-6)


@pytest.mark.parametrize("line,expected", GOLDEN["options"], ids=[o[0] for o in GOLDEN["options"]])
def test_in_prompt_options_match_kohya(line, expected):
    got = prompts.parse_prompt_line(line)
    assert expected.pop("negative_scale") is None  # --nl is rejected here (broken in kohya)
    for key, value in expected.items():
        if key == "negative_prompt" and value is None:
            value = ""  # kohya's default, set before its option loop
        assert getattr(got, key) == value, key
    assert got.raw == line


def test_prompt_file_skips_blank_and_hash_lines_like_kohya(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(GOLDEN["prompt_file"]["text"], encoding="utf-8")
    lines = prompts.read_prompt_file(path)
    assert [l.raw for l in lines] == GOLDEN["prompt_file"]["prompts"]
    assert lines[0].width == 512 and lines[2].seeds == [5]


@pytest.mark.parametrize("line,message", [
    ("cat --w 512px", "bad value for --w: '512px'"),
    ("cat --w", "bad value for --w: ''"),
    ("cat --n", "bad value for --n"),
    ("cat --d 1,,2", "bad value for --d"),
    ("cat --l 1.2.3", "bad value for --l"),
    ("cat --x 5", "unknown in-prompt option --x"),
    ("cat --dsd1 3", r"--dsd1 \(Deep Shrink\) is not supported"),
    ("cat --glt 500", r"--glt \(Gradual Latent\) is not supported"),
    ("cat --nl 3", r"--nl \(negative scale"),
    ("a {red|blue} car", "dynamic prompts"),
])
def test_malformed_line_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "p.txt"
    path.write_text(f"# header\nfine --w 512\n{line}\n", encoding="utf-8")
    with pytest.raises(UserError, match=f"p.txt:3: .*{message}"):
        prompts.read_prompt_file(path)


def test_unreadable_prompt_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="cannot read prompt file"):
        prompts.read_prompt_file(tmp_path / "missing.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00cat")
    with pytest.raises(UserError, match="not UTF-8"):
        prompts.read_prompt_file(tmp_path / "bin.txt")


def test_bad_weight_is_a_user_error():
    with pytest.raises(UserError, match="bad prompt weight '1.2.3'"):
        parse_prompt_attention("(cat:1.2.3)", breaks=True)


def test_seeds_reuse_the_last_one():
    assert [prompts.seed_for_image([4, 9], i) for i in range(4)] == [4, 9, 9, 9]


def _fake_embed(tokens):
    """The golden script's fake text encoder, chunk by chunk, concatenated: (B, 77n, 8)."""
    b, n, _ = tokens.shape
    emb = TABLE[tokens] + 0.01 * np.arange(prompts.CHUNK)[None, None, :, None]
    return emb.reshape(b, n * prompts.CHUNK, -1)


@pytest.mark.parametrize("index", range(len(GOLDEN["cases"])))
@pytest.mark.parametrize("te", ["te1", "te2"])
def test_text_plan_matches_kohya(index, te):
    case = GOLDEN["cases"][index]
    tokenizer = load_tokenizers()[0 if te == "te1" else 1]
    want = case[te]
    plan = prompts.text_plan(tokenizer, case["prompt"], case["uncond"], case["n"])
    limit = prompts.CHUNK_TOKENS * case["n"]
    for p, ids, weights in zip(case["prompt"], want["tokens"], want["weights"]):
        got_ids, got_weights = prompts.prompt_tokens(tokenizer, p, limit)
        assert got_ids == ids
        np.testing.assert_allclose(got_weights, weights, rtol=1e-6)
    # kohya calls the encoder once per chunk: prompts' chunks first, then the negatives'
    n = plan.tokens.shape[1]
    chunks = [plan.tokens[:, i].tolist() for i in range(n)]
    if plan.uncond_tokens is not None:
        chunks += [plan.uncond_tokens[:, i].tolist() for i in range(n)]
    assert chunks == want["chunks"]
    if "cond" in want:
        np.testing.assert_allclose(prompts.weighted_embeddings(_fake_embed(plan.tokens), plan.weights),
                                   want["cond"], rtol=1e-4, atol=1e-5)
        if want["uncond"] is not None:
            np.testing.assert_allclose(
                prompts.weighted_embeddings(_fake_embed(plan.uncond_tokens), plan.uncond_weights),
                want["uncond"], rtol=1e-4, atol=1e-5)


def test_plan_shapes_and_chunk_count():
    tok1, _ = load_tokenizers()
    long = ", ".join(f"word{i}" for i in range(40))  # ~120 tokens: two chunks
    plan = prompts.text_plan(tok1, [long, "cat"], ["", "dog"], max_embeddings_multiples=3)
    assert plan.tokens.shape == (2, 2, 77) and plan.weights.shape == (2, 154)
    assert plan.uncond_tokens.shape == (2, 2, 77)
    assert prompts.text_plan(tok1, [long], None, 1).tokens.shape == (1, 1, 77)


def test_regional_prompts_are_rejected():
    tok1, _ = load_tokenizers()
    with pytest.raises(UserError, match="regional prompts"):
        prompts.text_plan(tok1, ["a cat AND a dog"], None)


def test_weights_keep_the_mean():
    emb = np.random.default_rng(0).standard_normal((2, 77, 16)).astype(np.float32) + 0.5
    w = np.ones((2, 77))
    w[0, 3:6] = 1.5
    out = prompts.weighted_embeddings(emb, w)
    np.testing.assert_allclose(out.mean(axis=(1, 2)), emb.mean(axis=(1, 2)), rtol=1e-5)
    np.testing.assert_allclose(out[1], emb[1], rtol=1e-6)
