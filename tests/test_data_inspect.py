"""tools/inspect_dataset.py on the three example configs (configs/examples/) with generated
images, and every bad input the issue lists: one message, exit code 2."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from library.errors import exit_on_user_error

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "inspect_dataset.py"
EXAMPLES = ROOT / "configs" / "examples"
SELECT = json.loads((ROOT / "tests" / "fixtures" / "kohya_golden" / "buckets.json").read_text())["select_bucket"]


def kohya_row(no_upscale, wh):
    """kohya's bucket, resize and crop for an image at resolution 1024, min 256, max 2048, steps 64."""
    case = next(c for c in SELECT if c["bucket_no_upscale"] == no_upscale and c["resolution"] == [1024, 1024]
                and c["max_bucket_reso"] == 2048)
    return next(r for r in case["rows"] if r["image_wh"] == list(wh))


def expect(no_upscale, wh):
    row = kohya_row(no_upscale, wh)
    left, top = int(row["crop_ltrb"][0]), int(row["crop_ltrb"][1])
    return {"bucket_wh": row["bucket_wh"], "resized_wh": row["resized_wh"], "original_size_hw": [wh[1], wh[0]],
            "crop_top_left": [top, left], "target_size_hw": row["bucket_wh"][::-1]}


def save(path, wh, color=(120, 60, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", wh, color).save(path)


def inspect_json(cwd, *args):
    proc = subprocess.run([sys.executable, str(TOOL), *args, "--json"], cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def by_name(doc):
    return {Path(im["path"]).name: im for im in doc["images"]}


def test_dreambooth_class_tokens_with_reg_images(tmp_path):
    sizes = [(800, 1200), (1920, 1080), (500, 500)]
    for i, wh in enumerate(sizes):
        save(tmp_path / "data" / "sks_dog" / f"{i}.png", wh)
    for i in range(40):
        save(tmp_path / "data" / "reg_dog" / f"r{i:02d}.png", (64, 64))
    doc = inspect_json(tmp_path, "--dataset_config", str(EXAMPLES / "dataset_dreambooth_reg.toml"))
    [ds] = doc["datasets"]
    assert ds["num_train_images_with_repeats"] == 30
    assert ds["num_reg_images_with_repeats_before_balancing"] == 40
    assert ds["num_reg_samples_after_balancing"] == 30 and ds["unused_reg_images"] == 10
    assert {tuple(b["bucket_wh"]): b["count"] for b in ds["buckets"]} == {(832, 1216): 10, (1024, 1024): 40, (1344, 768): 10}
    images = by_name(doc)
    assert sorted(n for n in images if n.startswith("r")) == [f"r{i:02d}.png" for i in range(30)]  # first N by path
    for i, wh in enumerate(sizes):
        im = images[f"{i}.png"]
        assert {k: im[k] for k in expect(False, wh)} == expect(False, wh)
        assert im["caption"] == "sks dog" and im["num_repeats"] == 10
    assert images["r00.png"]["caption"] == "dog" and images["r00.png"]["is_reg"]
    assert doc["num_batches"] == 5 + 20 + 5


def test_caption_files(tmp_path):
    for i, wh in enumerate([(1024, 1024), (1920, 1080)]):
        save(tmp_path / "data" / "captioned" / f"p{i}.png", wh)
        (tmp_path / "data" / "captioned" / f"p{i}.txt").write_text(f"trigger{i}, red, green, blue\nignored line\n")
    doc = inspect_json(tmp_path, "--dataset_config", str(EXAMPLES / "dataset_caption_files.toml"))
    images = by_name(doc)
    for i, wh in enumerate([(1024, 1024), (1920, 1080)]):
        im = images[f"p{i}.png"]
        assert {k: im[k] for k in expect(False, wh)} == expect(False, wh)
        tags = im["caption"].split(", ")
        assert tags[0] == f"trigger{i}" and set(tags[1:]) <= {"red", "green", "blue"}   # keep_tokens, shuffle, tag dropout
        assert im["num_repeats"] == 2
    assert doc["datasets"][0]["batch_size"] == 4 and not doc["text_encoder_outputs_cacheable"]


def test_metadata_json(tmp_path):
    save(tmp_path / "data" / "ft_images" / "img001.png", (3000, 2000))
    save(tmp_path / "data" / "ft_images" / "img002.png", (500, 500))
    (tmp_path / "data" / "ft_meta.json").write_text(json.dumps({
        "img001.png": {"caption": "a photo of a cat", "tags": "cat, indoors"}, "img002.png": {"tags": "dog"}}))
    doc = inspect_json(tmp_path, "--dataset_config", str(EXAMPLES / "dataset_metadata_json.toml"))
    images = by_name(doc)
    assert doc["datasets"][0]["method"] == "finetuning"
    for name, wh in [("img001.png", (3000, 2000)), ("img002.png", (500, 500))]:
        # bucket_no_upscale: kohya's crop_ltrb fit is reported as is
        assert {k: images[name][k] for k in expect(True, wh)} == expect(True, wh)
    assert images["img001.png"]["caption"] == "a photo of a cat,cat, indoors"
    assert images["img002.png"]["caption"] == "dog"


def test_text_output_and_legacy_folders(tmp_path):
    save(tmp_path / "img" / "5_sks cat" / "a.png", (640, 480))
    proc = subprocess.run([sys.executable, str(TOOL), "--train_data_dir", str(tmp_path / "img"), "--resolution", "512",
                           "--enable_bucket"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "5 repeats" in proc.stdout and "sks cat" in proc.stdout and "bucket" in proc.stdout


def test_bad_input_exits_2_with_one_message(tmp_path):
    (tmp_path / "x.toml").write_text('[[datasets]]\nresolution = "1024"\n[[datasets.subsets]]\nimage_dir = "a"\n')
    proc = subprocess.run([sys.executable, str(TOOL), "--dataset_config", str(tmp_path / "x.toml")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: datasets[0] of ")
    assert "`resolution` = '1024'" in proc.stderr and not proc.stdout


@pytest.fixture(scope="module")
def inspect_main():
    spec = importlib.util.spec_from_file_location("inspect_dataset", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _subset_toml(subset, dataset="", general='resolution = 1024\nenable_bucket = true\n'):
    return f"[general]\n{general}\n[[datasets]]\n{dataset}\n[[datasets.subsets]]\n{subset}\n"


BAD = {
    "missing image_dir": (_subset_toml('image_dir = "nope"'), "image_dir nope does not exist"),
    "empty folder": (_subset_toml('image_dir = "empty"\nclass_tokens = "x"'), "image_dir empty has no images"),
    "corrupt image": (_subset_toml('image_dir = "corrupt"\nclass_tokens = "x"'), "cannot read image corrupt/bad.png"),
    "metadata entry without image": (_subset_toml('image_dir = "good"\nmetadata_file = "meta.json"'),
                                     "1 entries of meta.json have no image file: 'gone.png'"),
    "no caption nor class_tokens": (_subset_toml('image_dir = "good"'),
                                    "1 images have no .caption caption file and the subset has no class_tokens"),
    "resolution string": (_subset_toml('image_dir = "good"', general='resolution = "1024"'),
                          "`resolution` = '1024' has the wrong type"),
    "unknown key": (_subset_toml('image_dir = "good"\nshufle_caption = true'),
                    "datasets[0].subsets[0] of bad.toml: unknown key `shufle_caption`. Did you mean `shuffle_caption`?"),
    "num_repeats 0": (_subset_toml('image_dir = "good"\nnum_repeats = 0'), "`num_repeats` = 0 must be at least 1"),
    "batch_size 0": (_subset_toml('image_dir = "good"', dataset="batch_size = 0"), "`batch_size` = 0 must be at least 1"),
    "bucket step 60": (_subset_toml('image_dir = "good"', dataset="bucket_reso_steps = 60"),
                       "`bucket_reso_steps` = 60 must be a multiple of 8"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_inputs(tmp_path, monkeypatch, capsys, inspect_main, name):
    toml_text, message = BAD[name]
    (tmp_path / "empty").mkdir()
    save(tmp_path / "good" / "a.png", (64, 64))
    (tmp_path / "corrupt").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "corrupt" / "ok.png")
    (tmp_path / "corrupt" / "bad.png").write_bytes(b"\x89PNG broken")
    (tmp_path / "meta.json").write_text(json.dumps({"a.png": {"caption": "x"}, "gone.png": {"caption": "y"}}))
    (tmp_path / "bad.toml").write_text(toml_text)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["inspect_dataset.py", "--dataset_config", "bad.toml"])
    with pytest.raises(SystemExit) as exc:
        exit_on_user_error(inspect_main)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_skip_corrupt_images_flag_counts_them(tmp_path):
    save(tmp_path / "c" / "ok.png", (64, 64))
    (tmp_path / "c" / "bad.png").write_bytes(np.zeros(10, np.uint8).tobytes())
    (tmp_path / "d.toml").write_text(_subset_toml('image_dir = "c"\nclass_tokens = "x"'))
    doc = inspect_json(tmp_path, "--dataset_config", "d.toml", "--skip_corrupt_images")
    assert [Path(p).name for p in doc["datasets"][0]["skipped_corrupt_images"]] == ["bad.png"]
    assert [Path(im["path"]).name for im in doc["images"]] == ["ok.png"]
