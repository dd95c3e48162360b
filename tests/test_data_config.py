"""Dataset TOML validation, kohya's precedence and legacy folders, against values from kohya's
config_util (tests/fixtures/kohya_golden/config.json), and the error messages."""

import argparse
import json
import shlex
from pathlib import Path

import pytest
import toml

from library.data.config import (add_dataset_arguments, dreambooth_subsets_from_folders, resolve_dataset_configs,
                                 validate_user_config)
from library.errors import UserError

GOLDEN = json.loads((Path(__file__).parent / "fixtures" / "kohya_golden" / "config.json").read_text())

SUBSET_FIELDS = ["image_dir", "num_repeats", "shuffle_caption", "caption_separator", "keep_tokens", "keep_tokens_separator",
                 "secondary_separator", "enable_wildcard", "color_aug", "flip_aug", "random_crop", "caption_prefix",
                 "caption_suffix", "caption_dropout_rate", "caption_dropout_every_n_epochs", "caption_tag_dropout_rate",
                 "token_warmup_min", "token_warmup_step", "resize_interpolation", "alpha_mask"]
DATASET_FIELDS = ["network_multiplier", "validation_seed", "validation_split", "resize_interpolation", "batch_size",
                  "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale"]


def parse(argv):
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser)
    return parser.parse_args(argv)


def write(tmp_path, config, name="d.toml"):
    path = tmp_path / name
    path.write_text(toml.dumps(config))
    return str(path)


def flat(subset):
    values = {f: getattr(subset, f, None) for f in SUBSET_FIELDS}
    values.update({f: getattr(subset.caption, f) for f in SUBSET_FIELDS if hasattr(subset.caption, f)})
    return values


def test_precedence_matches_kohya(tmp_path):
    path = write(tmp_path, GOLDEN["user_config"])
    configs = resolve_dataset_configs(parse(GOLDEN["cli"] + ["--dataset_config", path]))
    assert len(configs) == len(GOLDEN["resolved"])
    for ours, theirs in zip(configs, GOLDEN["resolved"]):
        assert ours.is_dreambooth == theirs["is_dreambooth"]
        assert list(ours.resolution) == theirs["params"]["resolution"]
        for f in DATASET_FIELDS:
            assert getattr(ours, f) == theirs["params"][f], f
        for sub, tsub in zip(ours.subsets, theirs["subsets"]):
            for f, v in flat(sub).items():
                assert v == tsub[f], f
            if ours.is_dreambooth:
                assert (sub.is_reg, sub.class_tokens, sub.caption_extension) == \
                    (tsub["is_reg"], tsub["class_tokens"], tsub["caption_extension"])
            else:
                assert sub.metadata_file == tsub["metadata_file"]


def _probe_config(case):
    subset = {"image_dir": "/x/a"}
    if case.get("finetuning"):
        subset["metadata_file"] = "/x/m.json"
    cfg = {"datasets": [{"subsets": [subset]}]}
    if case["key"] == "mixed subsets":
        cfg["datasets"][0]["subsets"] = [{"image_dir": "/x/a", "metadata_file": "/x/m.json"}, {"image_dir": "/x/b"}]
    elif case["level"] == "top":
        cfg[case["key"]] = case["value"]
    elif case["level"] == "general":
        cfg["general"] = {case["key"]: case["value"]}
    elif case["level"] == "datasets":
        cfg["datasets"][0][case["key"]] = case["value"]
    else:
        subset[case["key"]] = case["value"]
    return cfg


@pytest.mark.parametrize("case", GOLDEN["type_acceptance"], ids=lambda c: f"{c['level']}.{c['key']}={c['value']!r}")
def test_keys_and_types_accepted_exactly_where_kohya_accepts_them(case):
    cfg = _probe_config(case)
    if case["accepted"]:
        validate_user_config(cfg, "x.toml")
    else:
        with pytest.raises(UserError, match="x.toml"):
            validate_user_config(cfg, "x.toml")


def test_bool_is_not_an_int_here():
    # voluptuous accepts `num_repeats = true` (bool is an int in Python); a typo we reject
    with pytest.raises(UserError, match="num_repeats` = True has the wrong type; expected an integer"):
        validate_user_config({"datasets": [{"subsets": [{"image_dir": "/a", "num_repeats": True}]}]}, "x.toml")


def test_legacy_folder_names_match_kohya(tmp_path):
    for name in GOLDEN["legacy_dirs"]["train"]:
        if name.endswith("(a file)"):
            (tmp_path / "train" / name.split(" ")[0]).write_text("")
        else:
            (tmp_path / "train" / name).mkdir(parents=True)
    for name in GOLDEN["legacy_dirs"]["reg"]:
        (tmp_path / "reg" / name).mkdir(parents=True)
    ours = dreambooth_subsets_from_folders(str(tmp_path / "train"), False) + \
        dreambooth_subsets_from_folders(str(tmp_path / "reg"), True)
    for s in ours:
        s["image_dir"] = str(Path(s["image_dir"]).relative_to(tmp_path))
    assert sorted(ours, key=lambda s: (s["is_reg"], s["image_dir"])) == GOLDEN["legacy_dirs"]["subsets"]


def test_legacy_cli_forms(tmp_path):
    (tmp_path / "img" / "5_sks cat").mkdir(parents=True)
    (tmp_path / "reg" / "1_cat").mkdir(parents=True)
    [ds] = resolve_dataset_configs(parse(shlex.split(
        f"--train_data_dir {tmp_path}/img --reg_data_dir {tmp_path}/reg --resolution 768,1024 --train_batch_size 2")))
    assert ds.resolution == (768, 1024) and ds.batch_size == 2
    assert [(s.num_repeats, s.class_tokens, s.is_reg) for s in ds.subsets] == [(5, "sks cat", False), (1, "cat", True)]
    meta = tmp_path / "meta.json"
    meta.write_text("{}")
    [ds] = resolve_dataset_configs(parse(shlex.split(
        f"--train_data_dir {tmp_path}/img --in_json {meta} --dataset_repeats 3 --resolution 1024")))
    assert not ds.is_dreambooth and ds.subsets[0].metadata_file == str(meta) and ds.subsets[0].num_repeats == 3


def test_caption_extension_gets_a_dot_and_legacy_alias(tmp_path):
    path = write(tmp_path, {"general": {"resolution": 512}, "datasets": [{"subsets": [{"image_dir": "/a"}]}]})
    [ds] = resolve_dataset_configs(parse(["--dataset_config", path, "--caption_extention", "txt"]))
    assert ds.subsets[0].caption_extension == ".txt"


@pytest.mark.parametrize("config, message", [
    ({"datasets": [{"resolution": "1024", "subsets": [{"image_dir": "/a"}]}]},
     r"datasets\[0\] of .*d.toml: `resolution` = '1024' has the wrong type; expected an integer or a list of two"),
    ({"general": {"resolution": 1024}, "datasets": [{"subsets": [{"image_dir": "/a"}, {"image_dir": "/b", "flip_agu": True}]}]},
     r"datasets\[0\].subsets\[1\] of .*d.toml: unknown key `flip_agu`. Did you mean `flip_aug`\? Allowed keys here: .*alpha_mask"),
    ({"general": {"alpha_mask": True}, "datasets": [{"subsets": [{"image_dir": "/a"}]}]},
     r"\[general\] of .*d.toml: unknown key `alpha_mask`"),
    ({"general": {"resolution": 1024}, "datasets": [{"subsets": [{"image_dir": "/a", "num_repeats": 0}]}]},
     r"datasets\[0\].subsets\[0\] of .*d.toml: `num_repeats` = 0 must be at least 1"),
    ({"general": {"resolution": 1024}, "datasets": [{"batch_size": 0, "subsets": [{"image_dir": "/a"}]}]},
     r"datasets\[0\] of .*d.toml: `batch_size` = 0 must be at least 1"),
    ({"general": {"resolution": 1024}, "datasets": [{"bucket_reso_steps": 60, "subsets": [{"image_dir": "/a"}]}]},
     r"`bucket_reso_steps` = 60 must be a multiple of 8"),
    ({"datasets": [{"subsets": [{"image_dir": "/a"}]}]}, r"no resolution"),
    ({"general": {"resolution": 1024}, "datasets": [{"subsets": [{"image_dir": "/a", "face_crop_aug_range": [1.0, 2.0]}]}]},
     r"`face_crop_aug_range` is a kohya key this port does not support"),
    ({"general": {"resolution": 1024}, "datasets": [{"subsets": [{"image_dir": "/a", "caption_dropout_rate": 1.5}]}]},
     r"`caption_dropout_rate` = 1.5 must be between 0 and 1"),
    ({"general": {"resolution": 1024}, "datasets": [{"subsets": [{"image_dir": "/a"}, {"image_dir": "/a"}]}]},
     r"/a is already used by another subset"),
    ({"general": {"resolution": 1024}, "datasets": [{"subsets": [{"num_repeats": 2}]}]},
     r"datasets\[0\].subsets\[0\] of .*: `image_dir` is required"),
    ({"general": {"resolution": 1024}, "datasets": []}, r"no \[\[datasets\]\] table"),
])
def test_bad_configs_name_key_table_and_file(tmp_path, config, message):
    path = write(tmp_path, config)
    with pytest.raises(UserError, match=message):
        resolve_dataset_configs(parse(["--dataset_config", path]))


def test_bad_cli_options_are_errors(tmp_path):
    path = write(tmp_path, {"datasets": [{"subsets": [{"image_dir": "/a"}]}]})
    for argv, message in [(["--resolution", "10x24"], "--resolution '10x24'"),
                          (["--resolution", "1024", "--face_crop_aug_range", "2.0,3.0"], "face_crop_aug_range"),
                          (["--resolution", "1024", "--cache_info"], "cache_info")]:
        with pytest.raises(UserError, match=message):
            resolve_dataset_configs(parse(["--dataset_config", path] + argv))
    with pytest.raises(UserError, match="not found"):
        resolve_dataset_configs(parse(["--dataset_config", str(tmp_path / "missing.toml")]))
    bad = tmp_path / "bad.toml"
    bad.write_text("[general\nx=")
    with pytest.raises(UserError, match="not valid TOML"):
        resolve_dataset_configs(parse(["--dataset_config", str(bad)]))
    with pytest.raises(UserError, match="no dataset"):
        resolve_dataset_configs(parse([]))
