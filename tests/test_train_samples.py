"""Training-time samples and validation: prompt files, file names, triggers and option checks
(pure Python, fast), the validation split and timesteps, then in process on the tiny model:
repeated samplings reuse one compiled graph without growing memory; and, in the full suite,
validation changes no weight, and a graph-mode command-line run with samples and validation."""

import argparse
import json
import os
import time

import numpy as np
import pytest
from PIL import Image, ImageDraw

from library.errors import UserError
from library.training.args import UNSUPPORTED, parse_args
from library.training.samples import (SamplePrompt, check_sample_options, is_due,
                                      load_sample_prompts, parse_sample_line, sample_file_name)
from library.training.validation import check_validation_options, validation_timesteps


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


# --- prompt files ----------------------------------------------------------------------------

def test_txt_prompts_with_kohyas_options(tmp_path):
    path = write(tmp_path / "p.txt", "# a comment\n\n"
                 "a cat --w 512 --h 768 --d 42 --s 20 --l 5.5 --n blurry, ugly --ss Euler_A\n"
                 "  # indented: a prompt, as kohya\n"
                 "a dog --W 100 --H 30 --S 5000\n"
                 "plain\n")
    cat, indented, dog, plain = load_sample_prompts(path)
    assert cat == SamplePrompt(index=0, prompt="a cat", negative_prompt="blurry, ugly", width=512,
                               height=768, steps=20, scale=5.5, seed=42, sampler="euler_a")
    assert indented.prompt == "# indented: a prompt, as kohya" and indented.index == 1
    # sizes round down to /8 with a floor of 64, steps clamp to 1..1000, names case-insensitive
    assert (dog.width, dog.height, dog.steps, dog.index) == (96, 64, 1000, 2)
    # the defaults: 1024x1024 (kohya's 512 is a known trap for SDXL), 30 steps, scale 7.5
    assert plain == SamplePrompt(index=3, prompt="plain", width=1024, height=1024, steps=30,
                                 scale=7.5, seed=None, sampler=None)


def test_toml_and_json_prompts(tmp_path):
    toml_path = write(tmp_path / "p.toml", """
[prompt]
width = 64
sample_steps = 4
scale = 6
[[prompt.subset]]
prompt = "first"
seed = 1
height = 96
[[prompt.subset]]
prompt = "second"
negative_prompt = "low quality"
sample_sampler = "k_euler"
""")
    first, second = load_sample_prompts(toml_path)
    assert first == SamplePrompt(0, "first", "", 64, 96, 4, 6.0, 1, None)
    assert second == SamplePrompt(1, "second", "low quality", 64, 1024, 4, 6.0, None, "k_euler")

    json_path = write(tmp_path / "p.json", json.dumps([
        {"prompt": "a", "width": 128, "seed": 3}, "b --h 64 --d 9"]))
    a, b = load_sample_prompts(json_path)
    assert (a.index, a.width, a.height, a.seed) == (0, 128, 1024, 3)
    assert (b.index, b.prompt, b.height, b.seed) == (1, "b", 64, 9)


def test_options_kohya_ignores_for_sdxl_warn(tmp_path, caplog):
    prompt = load_sample_prompts(write(tmp_path / "p.txt", "x --g 3.5 --fs 1\n"))[0]
    assert prompt.prompt == "x"
    assert "guidance_scale has no effect" in caplog.text and "flow_shift" in caplog.text


@pytest.mark.parametrize("name,text,fragment", [
    ("p.txt", "x --q 1\n", "unknown in-prompt option --q"),
    ("p.txt", "x --w 512px\n", "bad value for --w"),
    ("p.txt", "x --ss nosuch\n", "unknown sampler 'nosuch'"),
    ("p.txt", "x --cn a.png\n", "ControlNet"),
    ("p.txt", "# only a comment\n", "has no prompts"),
    ("p.toml", "[prompt]\nwidth = 64\n[[prompt.subset]]\nprompt = 'a'\nwidth = 96\n",
     "repeats width"),
    ("p.toml", "[prompt]\n[[prompt.subset]]\nprompt = 'a'\nsteps = 3\n", "unknown key 'steps'"),
    ("p.toml", "[prompt]\n[[prompt.subset]]\nprompt = 'a'\nwidth = '64'\n", "wrong type"),
    ("p.toml", "[[prompt.subset]]\nnegative_prompt = 'a'\n", "no `prompt`"),
    ("p.json", '{"prompt": "a"}', "expected a list"),
    ("p.json", "[1]", "a string or a table"),
    ("p.csv", "a\n", "use a .txt, .toml or .json"),
])
def test_prompt_file_errors_name_the_place(tmp_path, name, text, fragment):
    path = write(tmp_path / name, text)
    with pytest.raises(UserError, match=fragment) as e:
        load_sample_prompts(path)
    assert name in str(e.value)


def test_options_are_read_after_the_text_only():
    """kohya also matches the prompt text itself ("n ..." became a negative prompt)."""
    assert parse_sample_line("n is a letter --s 3", "x") == {"prompt": "n is a letter",
                                                              "sample_steps": 3}


# --- names and triggers ----------------------------------------------------------------------

def test_file_names_are_kohyas():
    when = time.mktime((2026, 1, 2, 3, 4, 5, 0, 0, -1))
    assert sample_file_name("lora", 0, 42, 10, when=when) == "lora_000010_00_20260102030405_42.png"
    assert sample_file_name("lora", 3, None, 10, epoch=2, when=when) == \
        "lora_e000002_03_20260102030405.png"
    assert sample_file_name(None, 12, None, 0, epoch=0, when=when) == "e000000_12_20260102030405.png"


def args_of(**kw):
    base = dict(sample_at_first=False, sample_every_n_steps=None, sample_every_n_epochs=None,
                sample_prompts=None, sample_sampler="ddim")
    return argparse.Namespace(**{**base, **kw})


def test_triggers_follow_kohya():
    steps = args_of(sample_every_n_steps=3)
    assert [s for s in range(10) if is_due(steps, s)] == [3, 6, 9]
    assert not is_due(steps, 6, epoch=1)            # not at an epoch end
    epochs = args_of(sample_every_n_steps=3, sample_every_n_epochs=2)   # steps are ignored
    assert not is_due(epochs, 6) and is_due(epochs, 6, epoch=2) and not is_due(epochs, 6, epoch=3)
    assert not is_due(steps, 0, epoch=0) and is_due(args_of(sample_at_first=True), 0, epoch=0)


def test_sample_option_checks(tmp_path, caplog):
    with pytest.raises(UserError, match="need --sample_prompts"):
        check_sample_options(args_of(sample_every_n_steps=5))
    off = args_of(sample_every_n_steps=0, sample_every_n_epochs=-1)
    assert check_sample_options(off) == [] and off.sample_every_n_steps is None
    path = write(tmp_path / "p.txt", "a\n")
    assert len(check_sample_options(args_of(sample_prompts=path))) == 1
    assert "no samples will be made" in caplog.text
    pndm = write(tmp_path / "pndm.txt", "a --s 3 --ss pndm\n")
    with pytest.raises(UserError, match="pndm.txt, prompt 1: pndm needs between 4"):
        check_sample_options(args_of(sample_prompts=pndm, sample_at_first=True,
                                     sample_sampler="ddim"))
    with pytest.raises(UserError, match="nope.txt"):
        check_sample_options(args_of(sample_prompts=str(tmp_path / "nope.txt"),
                                     sample_at_first=True))
    tall = write(tmp_path / "tall.txt", "a --w 832 --h 1208\n")    # a multiple of 8, not of 32
    with pytest.raises(UserError, match=r"tall.txt, prompt 1: --w/--h 832x1208: width and height "
                                        r"must be positive multiples of 32 for SDXL \(e.g. 832x1184\)"):
        check_sample_options(args_of(sample_prompts=tall, sample_at_first=True))


def test_options_are_defined_with_kohyas_defaults():
    for name in ("sample_every_n_steps", "sample_every_n_epochs", "sample_at_first",
                 "sample_prompts", "sample_sampler", "validate_every_n_steps",
                 "validate_every_n_epochs", "max_validation_steps"):
        assert name not in UNSUPPORTED
    _, a = parse_args([])
    assert (a.sample_every_n_steps, a.sample_every_n_epochs, a.sample_at_first, a.sample_prompts,
            a.sample_sampler) == (None, None, False, None, "ddim")
    assert (a.validate_every_n_steps, a.validate_every_n_epochs, a.max_validation_steps,
            a.validation_split, a.validation_seed) == (None, None, None, 0.0, None)
    with pytest.raises(SystemExit):
        parse_args(["--sample_sampler", "nosuch"])


def test_eval_mode_restores_each_cells_mode_and_phase():
    from mindspore import nn
    from library.training.samples import eval_mode
    net = nn.SequentialCell([nn.Dense(2, 2), nn.SequentialCell([nn.Dense(2, 2), nn.Dropout(p=0.5)])])
    net[1].set_train(True)
    state = [(c.training, c.phase) for _, c in net.cells_and_names()]
    assert {t for t, _ in state} == {True, False}
    with eval_mode(net):
        assert not any(c.training for _, c in net.cells_and_names())
    assert [(c.training, c.phase) for _, c in net.cells_and_names()] == state


# --- validation --------------------------------------------------------------------------------

def test_validation_timesteps_are_kohyas():
    assert validation_timesteps(0, 1000) == [200, 400, 600, 800]
    assert validation_timesteps(100, 600) == [200, 300, 400, 500]


def test_validation_options_need_a_validation_set():
    ns = argparse.Namespace(validate_every_n_steps=5, validate_every_n_epochs=None,
                            max_validation_steps=None)
    with pytest.raises(UserError, match="--validate_every_n_steps needs a validation set"):
        check_validation_options(ns, None)
    ns.validate_every_n_steps = 0
    with pytest.raises(UserError, match="must be 1 or more"):
        check_validation_options(ns, object())


def make_images(folder, n, size=(64, 64)):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.new("RGB", size, "white")
        ImageDraw.Draw(img).ellipse([8 + i % 20, 8, 48, 48], fill=(200, 30 + 20 * (i % 9), 30))
        img.save(folder / f"{i:03d}.png")
    return folder


@pytest.mark.parametrize("n,split", [(3, 0.5), (5, 0.3), (10, 0.25), (7, 0.2)])
def test_validation_split_never_overlaps_training(tmp_path, n, split):
    """kohya keeps train = ceil(n(1-f)) and val = round(nf); for n=3, f=0.5 (2 + 2) or n=5, f=0.3
    (4 + 2) the two share an image there. Here validation gets only what training leaves."""
    from library.data.dataset import build_dataset_groups
    from test_data_dataset import dataset_config, subset
    cfg = dataset_config([subset(make_images(tmp_path / "img", n))], validation_split=split)
    for seed in (1, 2):
        train, val = build_dataset_groups([cfg], seed=seed)
        tr = {r.path for r in train.datasets[0].records}
        va = {r.path for r in val.datasets[0].records}
        assert not tr & va and len(tr) + len(va) <= n and va
        assert len(tr) == int(np.ceil(n * (1 - split)))


def test_validation_split_that_holds_out_nothing_is_an_error(tmp_path):
    from library.data.dataset import build_dataset_groups
    from test_data_dataset import dataset_config, subset
    cfg = dataset_config([subset(make_images(tmp_path / "img", 2))], validation_split=0.1)
    with pytest.raises(UserError, match="holds out no image"):
        build_dataset_groups([cfg], seed=1)


# --- in process on the tiny model --------------------------------------------------------------

def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(scope="module")
def run(tiny_ckpt, tmp_path_factory):
    """prepare() + build_training() for a UNet LoRA with cached latents and text (the validation
    images are cached too), a validation set and a prompt file; nothing is compiled here."""
    from library.training.build import build_training, load_models
    from library.training.plan import prepare
    root = tmp_path_factory.mktemp("samples_run")
    make_images(root / "img" / "1_sks", 4)
    prompts = write(root / "prompts.txt", "sks circle --w 64 --h 64 --d 5 --s 2 --ss euler\n"
                    "a red thing --w 64 --h 64 --s 2 --n blurry --ss euler\n")
    _, args = parse_args(["--pretrained_model_name_or_path", str(tiny_ckpt),
                          "--train_data_dir", str(root / "img"), "--resolution", "64",
                          "--network_module", "networks.lora", "--output_dir", str(root / "out"),
                          "--output_name", "t", "--seed", "5", "--max_data_loader_n_workers", "0",
                          "--validation_split", "0.5", "--max_validation_steps", "1",
                          "--network_dropout", "0.5", "--network_train_unet_only",
                          "--cache_latents", "--cache_text_encoder_outputs",
                          "--sample_every_n_steps", "1", "--sample_prompts", prompts,
                          "--max_train_steps", "1"])
    plan = prepare(args)
    return plan, build_training(plan, load_models(args))


def lora_training_flags(training):
    return {lora.training for lora in training.network.loras}


@pytest.mark.full
def test_validation_writes_nothing_and_repeats_exactly(run):
    """Forward only: no LoRA parameter, gradient buffer or mode changes; the same noise every
    time (drawn from the validation seed), so two validations give the same loss. Dropouts are
    off (--network_dropout 0.5 would make the two differ). Full suite: eight op-by-op UNet
    forwards (about 45 s of CPU here)."""
    from library.training.validation import Validation
    plan, training = run
    params = list(training.grad_step.trainable) + list(training.grad_step.grad_buffers)
    before = [p.asnumpy().copy() for p in params]
    validation = Validation(plan, training, compile=False)
    assert validation.enabled and validation.batches == 1 and validation.timesteps == [200, 400, 600, 800]
    assert all(c is not None for c in training.validation_caches)
    first, second = validation.run(1), validation.run(2)
    validation.close()
    assert np.isfinite(first) and first == second
    assert all(np.array_equal(b, p.asnumpy()) for b, p in zip(before, params))
    assert lora_training_flags(training) == {True}
    scalars = validation.at_step(0, 1.0)        # kohya skips step 0
    assert scalars == {}


def test_repeated_samplings_reuse_one_graph_and_do_not_grow_memory(run):
    """Four samplings of two 64x64 prompts on the compiled pipeline: one graph, compiled once;
    RSS flat (from /proc/self/statm, after a warm-up sampling); files named and written as
    kohya's, the training modes restored after each sampling."""
    from library.training.samples import TrainingSampler
    plan, training = run
    sampler = TrainingSampler(plan.args, training.models)
    rss = []
    for step in range(1, 5):
        files = sampler(step)
        assert len(files) == 2 and all(os.path.isfile(f) for f in files)
        rss.append(rss_bytes())
        assert lora_training_flags(training) == {True}      # modes restored after each
    assert len(sampler.pipe.stats.graphs) == 1
    names = sorted(os.path.basename(f) for f in sampler.written)
    assert names[0].startswith("t_000001_00_") and names[0].endswith("_5.png")
    assert names[1].startswith("t_000001_01_") and not names[1].endswith("_5.png")
    with Image.open(sampler.written[0]) as img:
        assert img.size == (64, 64) and img.text["seed"] == "5" and img.text["sampler"] == "euler"
    growth = rss[-1] - rss[1]
    print("RSS after each sampling (MiB):", [r // 2 ** 20 for r in rss])
    assert growth < 20 * 2 ** 20, [r // 2 ** 20 for r in rss]
    assert not any(name.startswith(".") for name in os.listdir(sampler.folder))   # no temp files


# --- the command line, compiled (heavy: make test-full) -------------------------------------------

@pytest.mark.full
def test_cli_samples_and_validation_in_graph_mode(tiny_ckpt, tmp_path):
    """A graph-mode run as a user starts it (full suite: four graph compiles, several minutes
    here): samples at the requested steps and sizes, validation scalars at the requested steps
    and epoch, the train step compiled once although sampling and validation switch the models
    to eval mode and back, and the validation graph compiled once."""
    from conftest import run_tool
    from test_train_cli import read_log
    make_images(tmp_path / "img" / "2_sks", 6)
    prompts = write(tmp_path / "prompts.txt", "sks circle --w 64 --h 64 --d 5 --s 3\n"
                    "a red circle --w 64 --h 96 --s 2 --n blurry --ss euler\n")
    out = tmp_path / "out"
    run_tool("sdxl_train_network.py", "--pretrained_model_name_or_path", tiny_ckpt,
             "--network_module", "networks.lora", "--output_dir", out, "--output_name", "s",
             "--max_data_loader_n_workers", "0", "--seed", "3", "--train_data_dir",
             tmp_path / "img", "--resolution", "64", "--network_train_unet_only",
             "--cache_latents", "--cache_text_encoder_outputs", "--max_train_steps", "4",
             "--learning_rate", "1e-3", "--sample_every_n_steps", "2", "--sample_prompts",
             prompts, "--validation_split", "0.34", "--validate_every_n_steps", "2",
             "--max_validation_steps", "1", "--logging_dir", tmp_path / "logs")
    files = sorted(os.listdir(out / "sample"))
    assert [f[:12] for f in files] == ["s_000002_00_", "s_000002_01_", "s_000004_00_",
                                       "s_000004_01_"], files
    assert files[0].endswith("_5.png") and not files[1].endswith("_5.png")
    for name, size in zip(files, [(64, 64), (64, 96)] * 2):
        with Image.open(out / "sample" / name) as img:
            assert img.size == size
    steps, events = read_log(out / "s_log.jsonl")
    validated = [s["step"] for s in steps if "loss/validation/step_average" in s]
    assert validated == [2, 4]
    # the compiled validation and sampling graphs see the weights the apply graph updated
    averages = [s["loss/validation/step_average"] for s in steps if s["step"] in validated]
    assert averages[0] != averages[1]
    with Image.open(out / "sample" / files[0]) as a, Image.open(out / "sample" / files[2]) as b:
        assert not np.array_equal(np.asarray(a), np.asarray(b))
    assert all(np.isfinite(s["loss/validation/step_divergence"]) for s in steps if s["step"] in validated)
    epochs = [json.loads(x) for x in open(out / "s_log.jsonl")
              if '"epoch": 1,' in x and "event" not in x and "loss/validation/epoch_average" in x]
    assert len(epochs) == 1 and np.isfinite(epochs[0]["loss/validation/epoch_average"])
    compiles = [(e["graph"], tuple(e.get("shape", ()))) for e in events if e["event"] == "compile"]
    # one batch shape each: static graphs
    assert compiles.count(("grad_step", (1, 4, 8, 8))) == 1
    assert [c for c in compiles if c[0] == "validation"] == [("validation", (1, 4, 8, 8))]
    samples = [e for e in events if e["event"] == "sample"]
    # two sample sizes, one guided UNet graph
    assert [e["step"] for e in samples] == [2, 4] and samples[-1]["graphs"] == 1
    from library.safetensors_io import SafetensorsFile
    md = SafetensorsFile(out / "s.safetensors").metadata
    assert (md["ss_validate_every_n_steps"], md["ss_max_validation_steps"]) == ("2", "1")
