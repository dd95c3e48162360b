"""sdxl_train_network.py end to end on the tiny model, as a user runs it, plus the checks that
must fail fast. Graph compiles cost about a minute each on this machine, so the graph-mode runs
are few and each is checked for several things."""

import json
import os
import signal
import time

import numpy as np
import pytest
from PIL import Image, ImageDraw

from library.safetensors_io import SafetensorsFile
from conftest import SHARED_GRAPH_ARGS, run_tool, start_tool

COLORS = {"red": (210, 40, 40), "blue": (40, 60, 210), "green": (40, 170, 60)}


def draw(path, size, color, shape="circle"):
    w, h = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    box = [w * 0.2, h * 0.2, w * 0.8, h * 0.8]
    (d.ellipse if shape == "circle" else d.rectangle)(box, fill=COLORS[color])
    img.save(path)


@pytest.fixture(scope="module")
def three_methods(tmp_path_factory):
    """One dataset TOML using kohya's three methods, bucketing on (square images share one
    bucket, so the run compiles one step graph)."""
    root = tmp_path_factory.mktemp("three_methods")
    cls, reg, cap, meta = (root / n for n in ("class_tokens", "reg", "captions", "metadata"))
    for d in (cls, reg, cap, meta):
        d.mkdir()
    for i in range(2):
        draw(cls / f"c{i}.png", (64, 64), "red")
        draw(reg / f"r{i}.png", (64, 64), "green", "square")
        draw(cap / f"t{i}.png", (80, 80), "blue")
        (cap / f"t{i}.txt").write_text(f"a blue circle, wide, number {i}")
        draw(meta / f"m{i}.png", (48, 48), "red", "square")
    (meta / "meta.json").write_text(json.dumps({
        str(meta / f"m{i}.png"): {"caption": "a red square", "tags": f"tall, tag{i}"}
        for i in range(2)}))
    toml = root / "data.toml"
    toml.write_text(f"""
[general]
enable_bucket = true
resolution = 64
min_bucket_reso = 32
max_bucket_reso = 128
bucket_reso_steps = 32
batch_size = 1

[[datasets]]
  [[datasets.subsets]]
  image_dir = "{cls}"
  class_tokens = "sks circle"
  num_repeats = 2
  [[datasets.subsets]]
  image_dir = "{reg}"
  class_tokens = "square"
  is_reg = true

[[datasets]]
  [[datasets.subsets]]
  image_dir = "{cap}"
  caption_extension = ".txt"

[[datasets]]
  [[datasets.subsets]]
  image_dir = "{meta}"
  metadata_file = "{meta / 'meta.json'}"
""")
    return toml


def train(ckpt, out, *extra, check=True):
    return run_tool("sdxl_train_network.py", "--pretrained_model_name_or_path", ckpt,
                    "--network_module", "networks.lora", "--output_dir", out,
                    "--max_data_loader_n_workers", "0", "--seed", "3", *extra, check=check)


def read_log(path):
    lines = [json.loads(x) for x in open(path)]
    return [x for x in lines if "step" in x and "event" not in x], \
        [x for x in lines if "event" in x]


def test_three_dataset_methods_train_in_graph_mode(tiny_ckpt, three_methods, tmp_path):
    out = tmp_path / "out"
    train(tiny_ckpt, out, "--dataset_config", three_methods, "--output_name", "three",
          "--network_dim", "4", "--max_train_steps", "4", "--learning_rate", "1e-3",
          "--logging_dir", tmp_path / "logs")
    lora = out / "three.safetensors"
    check = run_tool("tools/check_lora.py", lora, "--model", tiny_ckpt, "--json")
    counts = json.loads(check.stdout)["counts"]
    assert counts["unmatched_keys"] == 0 and counts["matched"] == counts["modules_in_file"] > 0
    assert counts["te1"] > 0 and counts["te2"] > 0 and counts["unet"] > 0

    md = SafetensorsFile(lora).metadata
    datasets = json.loads(md["ss_datasets"])
    assert len(datasets) == 3 and [d["is_dreambooth"] for d in datasets] == [True, True, False]
    assert md["ss_num_train_images"] == "8" and md["ss_num_reg_images"] == "2"
    assert md["ss_steps"] == "4" and md["ss_network_module"] == "networks.lora"
    assert md["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert "sshs_model_hash" in md and md["ss_seed"] == "3"
    assert "tag0" in md["ss_tag_frequency"]

    steps, events = read_log(out / "three_log.jsonl")
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    assert all(np.isfinite(s["loss/current"]) for s in steps)
    # one batch shape: a static grad graph (images go into it) and the apply graph, both
    # compiled before step 1
    start = next(e for e in events if e["event"] == "start")
    compiles = [e for e in events if e["event"] == "compile"]
    assert start["buckets"] == [[64, 64]]
    assert [(c["graph"], c.get("shape"), c["ahead"]) for c in compiles] == [
        ("grad_step", [1, 3, 64, 64], True), ("apply_step", None, True)]
    assert (out / "three_loss.png").is_file()
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "logs").rglob("*"))


@pytest.fixture(scope="module")
def memorise(tmp_path_factory):
    """One red circle repeated 10 times per epoch, captioned; with _memorise_args: the suite's
    shared step graph (cached latents and text, UNet-only LoRA), high LR, 40 steps = 4 epochs."""
    root = tmp_path_factory.mktemp("memorise")
    (root / "img" / "10_sks").mkdir(parents=True)
    draw(root / "img" / "10_sks" / "a.png", (64, 64), "red")
    return root / "img"


def _memorise_args(ckpt, data, out):
    return ["--pretrained_model_name_or_path", ckpt, *SHARED_GRAPH_ARGS,
            "--output_dir", out, "--max_data_loader_n_workers", "0", "--seed", "3",
            "--train_data_dir", data, "--output_name", "mem",
            "--max_train_steps", "40", "--learning_rate", "3e-3",
            "--save_every_n_steps", "15", "--save_last_n_steps", "10",
            "--save_every_n_epochs", "1", "--save_last_n_epochs", "2"]


def _lora_tensors(path):
    f = SafetensorsFile(path)
    return {k: f.get(k) for k in f.keys()}


def test_memorisation_loss_falls_and_a_killed_run_resumes_to_the_same_file(tiny_ckpt, memorise,
                                                                            tmp_path):
    """The same seed gives the same LoRA file twice, even when the second run is killed
    (SIGKILL) mid-epoch after a state save and continued with --resume: bitwise equal."""
    run_tool("sdxl_train_network.py", *_memorise_args(tiny_ckpt, memorise, tmp_path / "a"))
    steps, _ = read_log(tmp_path / "a" / "mem_log.jsonl")
    losses = np.array([s["loss/current"] for s in steps])
    assert len(losses) == 40
    # random timesteps make single losses noisy (about +-0.1); the last ten are clearly lower
    assert losses[-10:].mean() < 0.95 * losses[:10].mean(), losses
    # kohya's names; keeping the last 10 steps drops step 15 at step 30, keeping the last two
    # epoch saves drops epoch 1 at epoch 3, and the last epoch (4) has the final file only
    saved = sorted(p.name for p in (tmp_path / "a").glob("*.safetensors"))
    assert saved == ["mem-000002.safetensors", "mem-000003.safetensors",
                     "mem-step00000030.safetensors", "mem.safetensors"]

    out = tmp_path / "b"
    state = out / "mem-step00000015-state"             # kohya's state folder name
    output = tmp_path / "killed_run.txt"
    proc = start_tool("sdxl_train_network.py", *_memorise_args(tiny_ckpt, memorise, out),
                      "--save_state", output=output)
    try:
        deadline = time.time() + 900
        while not (state / "train_state.json").is_file():
            assert proc.poll() is None and time.time() < deadline, output.read_text()[-3000:]
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)              # mid epoch 2 (batch 5 of 10)
    finally:
        proc.kill()
        proc.wait()
    assert not (out / "mem.safetensors").exists()
    progress = json.loads((state / "train_state.json").read_text())
    assert progress["current_step"] == 15 and progress["current_epoch"] == 2
    assert progress["data_position"] == {"seed": 3, "epoch": 2, "batch": 5}

    run_tool("sdxl_train_network.py", *_memorise_args(tiny_ckpt, memorise, out), "--save_state",
             "--resume", state)
    first, resumed = _lora_tensors(tmp_path / "a" / "mem.safetensors"), _lora_tensors(
        out / "mem.safetensors")
    assert first.keys() == resumed.keys()
    assert all(np.array_equal(first[k], resumed[k]) for k in first)
    # the resumed run saves and lets go of files and states as the uninterrupted one
    assert sorted(p.name for p in out.glob("*.safetensors")) == saved
    assert sorted(p.name for p in out.glob("*-state")) == [
        "mem-000002-state", "mem-000003-state", "mem-state", "mem-step00000030-state"]
    assert json.loads((out / "mem-state" / "train_state.json").read_text())["current_step"] == 40
    steps, events = read_log(out / "mem_log.jsonl")
    resume = next(e for e in events if e["event"] == "resume")
    assert resume["step"] == 15 and resume["epoch"] == 2
    assert [s["step"] for s in steps][-25:] == list(range(16, 41))


# --- fail fast, before any model is loaded ----------------------------------------------------

def _refused(proc, *fragments):
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: " in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    message = proc.stderr[proc.stderr.rindex("error: "):]
    for fragment in fragments:
        assert fragment in message, message
    assert "loaded" not in proc.stderr   # no model was loaded


def test_unknown_option(tiny_ckpt, tmp_path):
    proc = train(tiny_ckpt, tmp_path, "--not_an_option", "1", check=False)
    assert proc.returncode == 2 and "unrecognized arguments: --not_an_option" in proc.stderr


def test_unsupported_kohya_option_is_named(tiny_ckpt, memorise, tmp_path):
    proc = train(tiny_ckpt, tmp_path, "--train_data_dir", memorise, "--resolution", "64",
                 "--zero_terminal_snr", check=False)
    _refused(proc, "--zero_terminal_snr", "does not support")


def test_resume_from_a_folder_that_is_not_a_state(tiny_ckpt, memorise, tmp_path):
    (tmp_path / "half-state").mkdir()
    (tmp_path / "half-state" / "network.safetensors").write_bytes(b"cut short by a kill")
    proc = train(tiny_ckpt, tmp_path, "--train_data_dir", memorise, "--resolution", "64",
                 "--resume", tmp_path / "half-state", check=False)
    _refused(proc, "--resume", "half-state", "train_state.json")


@pytest.mark.parametrize("extra,fragments", [
    (["--cache_latents", "--color_aug"], ["color_aug"]),
    (["--v_pred_like_loss", "0.1", "--v_parameterization"], ["--v_pred_like_loss"]),
    (["--cache_text_encoder_outputs"], ["--network_train_unet_only"]),
    (["--adaptive_noise_scale", "0.1"], ["--noise_offset"]),
    (["--optimizer_type", "DAdaptAdam"], ["DAdaptAdam", "not supported"]),
    (["--network_args", "conv_dimm=4"], ["conv_dimm"]),
])
def test_contradictory_or_unknown_settings(tiny_ckpt, memorise, tmp_path, extra, fragments):
    proc = train(tiny_ckpt, tmp_path, "--train_data_dir", memorise, "--resolution", "64", *extra,
                 check=False)
    _refused(proc, *fragments)


def test_missing_model_file(memorise, tmp_path):
    proc = train(tmp_path / "nope.safetensors", tmp_path, "--train_data_dir", memorise,
                 "--resolution", "64", check=False)
    _refused(proc, "nope.safetensors", "not found")


def test_unwritable_output_dir(tiny_ckpt, memorise, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the output folder should be")
    proc = train(tiny_ckpt, blocker / "out", "--train_data_dir", memorise, "--resolution", "64",
                 check=False)
    _refused(proc, "--output_dir", "not writable")


def test_config_file_fills_options_and_rejects_unknown_keys(tiny_ckpt, memorise, tmp_path):
    from library.training.args import parse_args
    cfg = tmp_path / "train.toml"
    cfg.write_text('[model]\nnetwork_dim = 16\n[optimizer]\nlearning_rate = 5e-4\n'
                   'lr_warmup_steps = "10%"\n')
    _, args = parse_args(["--config_file", str(cfg), "--learning_rate", "1e-3"])
    assert args.network_dim == 16 and args.learning_rate == 1e-3 and args.lr_warmup_steps == 0.1
    cfg.write_text("[model]\nnetwork_dimm = 16\n")
    proc = train(tiny_ckpt, tmp_path, "--train_data_dir", memorise, "--resolution", "64",
                 "--config_file", cfg, check=False)
    _refused(proc, "network_dimm", "train.toml")


def test_non_finite_loss_stops_with_the_step_and_images(tiny_ckpt, memorise, tmp_path):
    tensors = {k: np.array(v) for k, v in
               ((k, SafetensorsFile(tiny_ckpt).get(k)) for k in SafetensorsFile(tiny_ckpt).keys())}
    tensors["model.diffusion_model.out.2.bias"][0] = np.nan
    from library.safetensors_io import write_safetensors
    bad = tmp_path / "nan.safetensors"
    write_safetensors(bad, tensors)
    out = tmp_path / "out"
    proc = run_tool("sdxl_train_network.py", "--pretrained_model_name_or_path", bad,
                    *SHARED_GRAPH_ARGS, "--output_dir", out, "--train_data_dir", memorise,
                    "--max_data_loader_n_workers", "0", "--max_train_steps", "3", check=False)
    assert proc.returncode == 2
    message = proc.stderr.strip().splitlines()[-1]
    assert "loss became nan at step 1" in message and "a.png" in message
    assert not any(p.suffix == ".safetensors" for p in out.iterdir())
