"""Caption processing against kohya's process_caption run after random.seed(s)
(tests/fixtures/kohya_golden/captions.json): a random.Random(s) must give the same output."""

import json
import random
from pathlib import Path

import pytest

from library.data.captions import CaptionOptions, metadata_caption, process_caption, read_caption_file
from library.errors import UserError

CASES = json.loads((Path(__file__).parent / "fixtures" / "kohya_golden" / "captions.json").read_text())["cases"]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['caption'][:20]!r}-{sorted(c['options'])}")
def test_process_caption_matches_kohya_for_each_seed(case):
    opts = CaptionOptions(**case["options"])
    for seed, expected in case["outputs_by_seed"].items():
        got = process_caption(case["caption"], opts, random.Random(int(seed)), epoch=case["epoch"],
                              step=case["step"], max_train_steps=case["max_train_steps"])
        assert got == expected, (seed, got, expected)


def test_processing_uses_only_the_given_rng():
    opts = CaptionOptions(shuffle_caption=True, caption_tag_dropout_rate=0.3)
    random.seed(1)
    before = random.getstate()
    a = process_caption("a, b, c, d, e", opts, random.Random(7))
    assert random.getstate() == before
    assert a == process_caption("a, b, c, d, e", opts, random.Random(7))


def test_caption_file_first_line_and_wildcard_lines(tmp_path):
    img = tmp_path / "x.png"
    (tmp_path / "x.txt").write_text("first, a\n\nsecond\n", encoding="utf-8")
    assert read_caption_file(str(img), ".txt", False) == "first, a"
    assert read_caption_file(str(img), ".txt", True) == "first, a\nsecond"
    assert read_caption_file(str(img), ".caption", False) is None


def test_face_crop_named_image_falls_back_to_base_caption(tmp_path):
    (tmp_path / "name.caption").write_text("base caption")
    assert read_caption_file(str(tmp_path / "name_1_2_3_4.png"), ".caption", False) == "base caption"


def test_empty_or_non_utf8_caption_file_is_a_user_error(tmp_path):
    (tmp_path / "e.caption").write_text("")
    with pytest.raises(UserError, match="e.caption is empty"):
        read_caption_file(str(tmp_path / "e.png"), ".caption", False)
    (tmp_path / "b.caption").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(UserError, match="not UTF-8"):
        read_caption_file(str(tmp_path / "b.png"), ".caption", False)


def test_metadata_caption_joins_caption_and_tags_like_kohya():
    assert metadata_caption({"caption": "a photo", "tags": "1girl, solo"}, ",", False) == "a photo,1girl, solo"
    assert metadata_caption({"tags": "1girl"}, ",", False) == "1girl"
    assert metadata_caption({"caption": "a photo"}, ",", False) == "a photo"
    assert metadata_caption({"caption": "l1\nl2", "tags": "t1\nt2"}, ",", True) == "l1,t1,t2\nl2,t1,t2"


def test_static_captions_allow_text_encoder_caching():
    assert CaptionOptions(caption_prefix="p", secondary_separator=";").is_static()
    for kw in ({"shuffle_caption": True}, {"caption_dropout_rate": 0.1}, {"token_warmup_step": 5},
               {"caption_dropout_every_n_epochs": 2}, {"enable_wildcard": True}):
        assert not CaptionOptions(**kw).is_static()
