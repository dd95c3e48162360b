"""Faults and bad inputs (issue 11): each ends with one clear message, the right exit code, and
nothing lost that was already done.

Most cases fail at parse time or in a pure function and are checked in-process; the few that need
MindSpore running (a Ctrl-C during a bare graph loop, and the training runs for Ctrl-C and a full
disk) run as subprocesses, in PyNative mode on the tiny model with a LoRA on one block only, so a
step costs seconds, not a graph compile.
"""

import errno
import json
import os
import resource
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import ONE_BLOCK, ROOT, SHARED_GRAPH_ARGS, run_tool
from library.errors import UserError


# --- 1. disk full at a save ---------------------------------------------------------------------

@contextmanager
def file_size_limit(nbytes):
    """RLIMIT_FSIZE for this process: a write past it fails with EFBIG (Python ignores
    SIGXFSZ), as a write to a full disk fails with ENOSPC."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_a_save_past_the_limit_keeps_the_previous_file_and_leaves_no_temp(tmp_path):
    from library.safetensors_io import SafetensorsFile, write_safetensors
    path = tmp_path / "lora.safetensors"
    write_safetensors(path, {"a": np.ones(16, np.float32)})
    before = path.read_bytes()
    with file_size_limit(64 * 1024):
        with pytest.raises(OSError) as caught:
            write_safetensors(path, {"a": np.ones(64 * 1024, np.float32)})
    assert caught.value.errno == errno.EFBIG
    assert path.read_bytes() == before and SafetensorsFile(path).get("a").shape == (16,)
    assert os.listdir(tmp_path) == ["lora.safetensors"]


def test_a_failed_save_is_reported_once_and_the_next_save_is_still_tried(tmp_path, caplog):
    from library.training.saving import SaveFailed, SaveGroup

    def full():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    saves = SaveGroup()
    assert not saves.attempt("out/a-state", full)
    assert saves.attempt("out/a.safetensors", lambda: None)
    with pytest.raises(SaveFailed) as caught:
        saves.raise_if_failed(12)
    message = str(caught.value)
    assert "step 12" in message and "out/a-state (No space left on device)" in message
    assert "Saved at this step: out/a.safetensors" in message and "--resume" in message
    assert not caplog.records       # the one message is the error
    SaveGroup().raise_if_failed(3)      # nothing failed: nothing raised


def _save_args(**kw):
    base = dict(max_train_steps=100, save_every_n_steps=None, save_every_n_epochs=None,
                save_last_n_steps=None, save_last_n_epochs=None, save_state=False,
                save_state_on_train_end=False, save_last_n_steps_state=None,
                save_last_n_epochs_state=None)
    return SimpleNamespace(**{**base, **kw})


@pytest.mark.parametrize("options, epochs, files, states", [
    ({}, 1, 2, 0),                                                   # final + a temp copy
    ({"save_every_n_steps": 10}, 1, 11, 0),                          # steps 10..90
    ({"save_every_n_steps": 10, "save_last_n_steps": 20}, 1, 5, 0),  # 3 kept at once
    ({"save_every_n_epochs": 1, "save_last_n_epochs": 2}, 5, 4, 0),
    ({"save_every_n_steps": 50, "save_state": True}, 1, 3, 3),
    ({"save_state_on_train_end": True}, 1, 2, 2),
])
def test_the_start_up_estimate_counts_the_saves_kept(options, epochs, files, states):
    from library.training.saving import planned_writes
    writes = planned_writes(_save_args(**options), epochs, lora_bytes=1000, state_bytes=3000)
    assert writes[0] == (f"{files} LoRA file(s) of 1000 B", files * 1000)
    assert (writes[1][1] if states else 0) == states * 3000


def test_a_short_disk_is_warned_about_with_the_numbers(tmp_path):
    from library.training.saving import free_space_warning, planned_writes
    writes = planned_writes(_save_args(save_every_n_steps=10), 1, 2 * 1024 ** 2, 0, 4, 3 * 2 ** 20)
    warning = free_space_warning(str(tmp_path), writes, free=10 * 1024 ** 2)
    assert "has 10.0 MB free" in warning and "34.0 MB" in warning and "--save_last_n_steps" in warning
    assert "11 LoRA file(s) of 2.0 MB" in warning and "4 sample image(s)" in warning
    assert free_space_warning(str(tmp_path), writes, free=100 * 1024 ** 2) is None


def test_disk_caches_are_counted_per_image_folder(tmp_path):
    from library.training.saving import CACHES_HINT, disk_cache_writes, free_space_warning
    folder = tmp_path / "img"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        _png(folder / name)
    group = _group(folder, image_dir=str(folder), class_tokens="sks", flip_aug=True)
    writes = disk_cache_writes(group, latents=True, text=True, text_tokens=77)
    latent = 4 * (64 // 8) * (64 // 8) * 4 * 2     # float32, and flipped too
    assert writes == {str(folder): [("latent caches", 2 * latent),
                                    ("text-encoder caches", 2 * (77 * 2048 + 1280) * 4)]}
    warning = free_space_warning(str(folder), writes[str(folder)], free=1000,
                                 label="the image folder", hint=CACHES_HINT)
    assert warning.startswith(f"the image folder {folder} has 1000 B free") and "in memory" in warning


def test_the_run_warns_at_start_up_from_its_own_tensors(tmp_path, monkeypatch, caplog):
    import shutil
    from library.training import saving
    lora = [SimpleNamespace(name="down", size=512, itemsize=4)]
    moments = SimpleNamespace(name="moments", size=1024, itemsize=4)
    apply_step = SimpleNamespace(grad_buffers=[], get_parameters=lambda: [*lora, moments],
                                 optimizer=SimpleNamespace(scratch_names=set()))
    args = _save_args(save_every_n_steps=25, save_state=True, output_dir=str(tmp_path),
                      sample_at_first=True, sample_every_n_steps=50, sample_every_n_epochs=None)
    prompts = [SimpleNamespace(width=64, height=32)] * 2
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=4096))
    saving.warn_if_disk_short(args, SimpleNamespace(num_epochs=1), lora, apply_step, "float16",
                              prompts)
    # saves at 25, 50, 75 + final + temp copy, of 1 KB (fp16) and states of 6 KB (float32);
    # samples at 0, 50, 100: 3 x 2 images of 64 x 32 x 3 bytes; 5 + 30 + 36 KB
    assert f"--output_dir {tmp_path} has 4.0 KB free, and this run writes up to 71.0 KB there " \
           "(5 LoRA file(s) of 1.0 KB, 5 state folder(s) of 6.0 KB, 6 sample image(s))" \
           in caplog.text


# --- 2. Ctrl-C and SIGTERM --------------------------------------------------------------------

# MindSpore replaces Python's SIGINT handler during graph runs (library.training.interrupts):
# a bare jit loop is the smallest program that shows it.
BARE_LOOP = """
import sys, time
import numpy as np
import mindspore as ms
from mindspore import Tensor, ops
from library.errors import exit_on_user_error
from library.training.interrupts import Interrupted, StopRequests

@ms.jit
def step(a):
    return ops.matmul(a, a) * 0.5

def main():
    x = Tensor(np.ones((32, 32), np.float32))
    with StopRequests() as stop:
        stop.start_training()
        for i in range(10 ** 6):
            step(x)
            if i == 2:
                print("looping", flush=True)
            # "busy": a step that outlasts both signals, so only the second one can end it
            if stop.requested.is_set() and sys.argv[1] != "busy":
                raise Interrupted(f"stopped at iteration {i}")
            time.sleep(0.01)

exit_on_user_error(main)
"""


@pytest.mark.parametrize("signals, message", [
    ([signal.SIGINT], "interrupted: stopped at iteration"),
    ([signal.SIGTERM], "interrupted: stopped at iteration"),
    ([signal.SIGINT, signal.SIGINT], "again: exiting now, nothing more is saved"),
    ([signal.SIGINT, signal.SIGTERM], "again: exiting now, nothing more is saved"),
])
def test_a_signal_stops_a_graph_loop_at_its_end_and_a_second_one_at_once(signals, message,
                                                                         tmp_path):
    script = tmp_path / "bare_loop.py"     # ms.jit needs the source in a file
    script.write_text(BARE_LOOP)
    busy = "busy" if len(signals) > 1 else "check"
    proc = subprocess.Popen([sys.executable, script, busy], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert proc.stdout.readline() == "looping\n", proc.stderr.read()
        for s in signals:
            proc.send_signal(s)
            time.sleep(0.5)     # two presses, not one: the kernel merges a pending repeat
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "stop requested" in err and message in err and "Traceback" not in err
    assert ("interrupted: stopped" in err) == (len(signals) == 1)   # the second: no clean-up


# --- faults during real training runs ---------------------------------------------------------
# In graph mode on the suite's shared step graph where the run trains many steps (Ctrl-C),
# otherwise PyNative with a LoRA on one UNet block (seconds a step, and no compile-cache files
# to write under a file-size limit).


@pytest.fixture(scope="module")
def one_image(tmp_path_factory):
    from PIL import Image, ImageDraw
    root = tmp_path_factory.mktemp("one_image")
    (root / "10_sks").mkdir()      # 10 repeats: 10 steps an epoch, so a stop is mid-epoch
    img = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(img).ellipse([12, 12, 52, 52], fill=(210, 40, 40))
    img.save(root / "10_sks" / "a.png")
    return root


def _run_args(ckpt, data, out, steps, *extra):
    return ["sdxl_train_network.py", "--pretrained_model_name_or_path", ckpt,
            "--network_module", "networks.lora", "--output_dir", out, "--seed", "3",
            "--train_data_dir", data, "--resolution", "64", "--output_name", "mem",
            "--network_dim", "4", "--network_args", ONE_BLOCK, "--max_train_steps", str(steps),
            "--learning_rate", "3e-3", "--network_train_unet_only", "--cache_latents",
            "--cache_text_encoder_outputs", "--pynative", *extra]


def _graph_run_args(ckpt, data, out, steps, *extra):
    return ["sdxl_train_network.py", "--pretrained_model_name_or_path", ckpt, *SHARED_GRAPH_ARGS,
            "--output_dir", out, "--seed", "3", "--train_data_dir", data, "--output_name", "mem",
            "--max_train_steps", str(steps), "--learning_rate", "3e-3", *extra]


def _tensors(path):
    from library.safetensors_io import SafetensorsFile
    f = SafetensorsFile(path)
    return {k: f.get(k) for k in f.keys()}


def _logged_steps(path):
    if not path.is_file():
        return 0
    return sum(1 for line in path.read_text().splitlines() if line.startswith('{"step"'))


def test_ctrl_c_saves_an_interrupted_lora_and_a_state_that_resumes_to_the_same_lora(
        tiny_ckpt, one_image, tmp_path):
    steps = 40        # about 0.1 s each: the signal comes well before the last
    run_tool(*_graph_run_args(tiny_ckpt, one_image, tmp_path / "a", steps, "--max_data_loader_n_workers",
                        "0"))
    reference = _tensors(tmp_path / "a" / "mem.safetensors")

    # Ctrl-C in a terminal signals the whole process group, data-loader workers included
    out = tmp_path / "b"
    log = tmp_path / "b.txt"
    with open(log, "w") as sink:
        proc = subprocess.Popen([sys.executable, *map(str, _graph_run_args(
            tiny_ckpt, one_image, out, steps, "--save_state", "--max_data_loader_n_workers", "1"))],
            cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        deadline = time.time() + 600
        while _logged_steps(out / "mem_log.jsonl") < 2:
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text()
    assert proc.returncode == 130, text[-3000:]
    assert "Traceback" not in text and "stop requested" in text
    message = text[text.rindex("interrupted: "):]
    state = out / "mem-interrupted-state"
    assert f"saved {out / 'mem-interrupted.safetensors'} and the state {state}" in message
    assert f"continue with --resume {state}" in message
    stopped_at = json.loads((state / "train_state.json").read_text())["current_step"]
    assert 2 <= stopped_at < steps and f"after step {stopped_at} of {steps}" in message
    assert not (out / "mem.safetensors").exists()
    assert not [p for p in os.listdir(out) if p.startswith(".tmp-")]
    check = run_tool("tools/check_lora.py", out / "mem-interrupted.safetensors", "--model",
                     tiny_ckpt, "--json")
    assert json.loads(check.stdout)["counts"]["unmatched_keys"] == 0

    run_tool(*_graph_run_args(tiny_ckpt, one_image, out, steps, "--save_state", "--resume", state,
                        "--max_data_loader_n_workers", "0"))
    resumed = _tensors(out / "mem.safetensors")
    assert resumed.keys() == reference.keys()
    assert all(np.array_equal(reference[k], resumed[k]) for k in reference)


def test_ctrl_c_before_the_first_step_stops_with_nothing_saved(tiny_ckpt, one_image, tmp_path):
    out, log = tmp_path / "out", tmp_path / "run.txt"
    with open(log, "w") as sink:
        proc = subprocess.Popen([sys.executable, *map(str, _run_args(
            tiny_ckpt, one_image, out, 3, "--max_data_loader_n_workers", "0"))], cwd=ROOT,
            stdout=sink, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        deadline = time.time() + 300
        while " loaded " not in log.read_text():      # the model is loaded: caching comes next
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=300)
    finally:
        proc.kill()
    text = log.read_text()
    assert proc.returncode == 130, text[-3000:]
    assert "nothing is trained yet" in text and "Traceback" not in text
    assert text.rstrip().endswith("interrupted: stopped before training started: nothing was saved")
    assert not list(out.glob("*.safetensors")) and not list(out.glob(".tmp-*"))


def test_a_full_disk_at_the_final_save_keeps_the_old_state_and_still_saves_the_lora(
        tiny_ckpt, one_image, tmp_path):
    """RLIMIT_FSIZE between the LoRA file (about 105 KB) and the state's optimizer file (about
    200 KB): the state save fails, the LoRA save after it is still tried."""
    out = tmp_path / "out"
    (out / "mem-state").mkdir(parents=True)
    (out / "mem-state" / "train_state.json").write_text("the previous run's state")
    stale = out / f".tmp-{_dead_pid()}-k3j4mem.safetensors"     # a killed run's half save
    stale.write_bytes(b"half a LoRA")
    limit = 150 * 1024
    proc = subprocess.run(
        [sys.executable, *map(str, _run_args(tiny_ckpt, one_image, out, 1, "--save_state",
                                              "--max_data_loader_n_workers", "0"))],
        cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)),
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert f"removed 1 temp file(s) that an interrupted save left in {out}: {stale.name}" \
        in proc.stderr
    assert proc.stderr.count("File too large") == 1         # one message
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith(f"error: the save at step 1 failed: {out / 'mem-state'} (File too "
                              "large). Saved at this step: "), message
    assert str(out / "mem.safetensors") in message and "free space" in message
    assert (out / "mem-state" / "train_state.json").read_text() == "the previous run's state"
    assert not [p for p in os.listdir(out) if p.startswith(".tmp-")]
    assert _tensors(out / "mem.safetensors")


# --- 3. temp entries a killed save left -------------------------------------------------------

def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid     # not reused this soon on Linux (pids count up)


def test_stale_temp_entries_are_removed_and_live_ones_kept(tmp_path, caplog):
    from library.training.saving import remove_stale_temp
    caplog.set_level("INFO")
    dead, now = _dead_pid(), time.time()
    (tmp_path / f".tmp-{dead}-abcd1234mem.safetensors").write_bytes(b"half a LoRA")
    (tmp_path / f".tmp-{dead}-mem-state").mkdir()
    (tmp_path / f".tmp-{dead}-mem-state" / "network.safetensors").write_bytes(b"half")
    (tmp_path / f".tmp-{os.getpid()}-xyz_other.safetensors").write_bytes(b"being written now")
    old = tmp_path / ".tmp-mem-state-123"      # an earlier version's name, without a pid first
    old.mkdir()
    os.utime(old, (now - 7200, now - 7200))
    (tmp_path / ".tmp-q1w2e3r4new.safetensors").write_bytes(b"recent, owner unknown")
    (tmp_path / "mem.safetensors").write_bytes(b"a finished LoRA")
    removed = remove_stale_temp(str(tmp_path), now=now)
    assert sorted(removed) == sorted([".tmp-mem-state-123", f".tmp-{dead}-mem-state",
                                      f".tmp-{dead}-abcd1234mem.safetensors"])
    assert sorted(os.listdir(tmp_path)) == sorted([
        f".tmp-{os.getpid()}-xyz_other.safetensors", ".tmp-q1w2e3r4new.safetensors",
        "mem.safetensors"])
    assert "removed 3 temp file(s)" in caplog.text


def test_temp_names_carry_the_writer_pid(tmp_path, monkeypatch):
    """What remove_stale_temp relies on: both temp writers put their pid first."""
    import library.safetensors_io as io
    import library.training.state as state
    seen = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (seen.append(os.path.basename(a)),
                                                     real_replace(a, b)))
    io.write_atomically(tmp_path / "x.bin", [b"x"])
    fake = SimpleNamespace(grad_buffers=[], get_parameters=lambda: [],
                           optimizer=SimpleNamespace(layout=SimpleNamespace(description=dict),
                                                     scratch_names=set()))
    state.save_state(str(tmp_path / "s-state"), [], fake, {"current_step": 1})
    assert seen[0].startswith(f".tmp-{os.getpid()}-") and seen[0].endswith("x.bin")
    assert f".tmp-{os.getpid()}-s-state" in seen


# --- 4. numbers checked at parse time ---------------------------------------------------------

@pytest.mark.parametrize("argv, fragment", [
    (["--learning_rate", "-0.0001"], "--learning_rate -0.0001: must be 0 or more"),
    (["--learning_rate", "nan"], "--learning_rate nan: must be a finite number"),
    (["--learning_rate", "inf"], "--learning_rate inf: must be a finite number"),
    (["--unet_lr", "-1"], "--unet_lr -1.0: must be 0 or more"),
    (["--unet_lr", "nan"], "--unet_lr nan"),
    (["--text_encoder_lr", "1e-4", "-0.00001"], "--text_encoder_lr -1e-05: must be 0 or more"),
    (["--text_encoder_lr", "inf"], "--text_encoder_lr inf"),
    (["--max_train_epochs", "0"], "--max_train_epochs 0: must be 1 or more"),
    (["--max_train_epochs", "-3"], "--max_train_epochs -3"),
    (["--network_alpha", "-1"], "--network_alpha -1.0: must be 0 or more"),
    (["--network_dim", "0"], "--network_dim 0: must be 1 or more"),
    (["--network_dim", "-4"], "--network_dim -4"),
    (["--seed", "-1"], "--seed -1: must be between 0 and 4294967295"),
    (["--seed", str(2 ** 32)], "--seed 4294967296"),
    (["--network_dropout", "1.5"], "--network_dropout 1.5: must be between 0 and 1"),
    (["--noise_offset", "nan"], "--noise_offset nan: must be a finite number"),
    (["--save_every_n_steps", "-5"], "--save_every_n_steps -5"),
    (["--min_snr_gamma", "-1"], "--min_snr_gamma -1.0: must be 0 or more"),
    (["--huber_c", "0"], "--huber_c 0.0: must be above 0"),
    (["--multires_noise_discount", "2"], "--multires_noise_discount 2.0: must be between 0 and 1"),
    (["--lr_scheduler_power", "-1"], "--lr_scheduler_power -1.0"),
    (["--lr_decay_steps", "-0.5"], "--lr_decay_steps -0.5: must be 0 or more"),
    (["--max_data_loader_n_workers", "-1"], "--max_data_loader_n_workers -1"),
])
def test_trainer_numbers_out_of_range(argv, fragment):
    from library.training.args import parse_args
    with pytest.raises(UserError, match="^" + fragment.replace("+", r"\+").replace(".", r"\.")):
        parse_args(argv)


def test_a_float_warmup_count_names_the_option(tmp_path):
    proc = run_tool("sdxl_train_network.py", "--lr_warmup_steps", "1.0", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "argument --lr_warmup_steps: '1.0' is neither a step count" in proc.stderr
    from library.training.args import parse_args
    cfg = tmp_path / "c.toml"
    cfg.write_text("lr_warmup_steps = 2.5\n")
    with pytest.raises(UserError, match=r"c\.toml: `lr_warmup_steps = 2\.5`: 2\.5 is neither"):
        parse_args(["--config_file", str(cfg)])


def test_zero_means_off_for_save_counts_as_in_kohya_configs():
    from library.training.args import parse_args
    _, args = parse_args(["--save_every_n_epochs", "0", "--learning_rate", "0", "--seed", "0"])
    assert args.save_every_n_epochs == 0 and args.learning_rate == 0


@pytest.mark.parametrize("argv, fragment", [
    (["--scale", "nan"], "--scale nan: must be a finite number"),
    (["--strength", "inf"], "--strength inf"),
    (["--network_mul", "1", "nan"], "--network_mul nan"),
    (["--seed", "-2"], "--seed -2: must be between 0"),
    (["--vae_batch_size", "0"], "--vae_batch_size 0.0: must be above 0"),
    (["--max_embeddings_multiples", "0"], "--max_embeddings_multiples 0: must be 1 or more"),
    (["--highres_fix_strength", "1.5"], "--highres_fix_strength 1.5: must be between 0 and 1"),
    (["--original_width", "-5"], "--original_width -5"),
    (["--crop_top", "-3"], "--crop_top -3: must be 0 or more"),
    (["--network_module", "networks.lora", "--network_weights", "a.safetensors", "--network_mul",
      "1", "0.5"], "2 --network_mul for 1 --network_weights"),
])
def test_generator_numbers_out_of_range(argv, fragment):
    from library.generation.cli import check_args
    from library.generation.args import setup_parser
    args = setup_parser().parse_args(["--ckpt", "x.safetensors", "--prompt", "a cat", *argv])
    with pytest.raises(UserError, match="^" + fragment.replace(".", r"\.")):
        check_args(args)


@pytest.mark.parametrize("argv, fragment", [
    (["--new_rank", "0"], "--new_rank 0: must be 1 or more"),
    (["--new_rank", "4", "--new_conv_rank", "0"], "--new_conv_rank 0"),
    (["--ratios", "nan"], "--ratios nan: must be a finite number"),
])
def test_merge_tool_numbers_out_of_range(tmp_path, argv, fragment):
    proc = run_tool("tools/merge_lora.py", "--models", tmp_path / "a.safetensors", "--save_to",
                    tmp_path / "m.safetensors", *argv, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"error: {fragment}" in proc.stderr


@pytest.mark.parametrize("script, argv, message", [
    ("sdxl_train_network.py", ["--seed", "-1"], "error: --seed -1: must be between 0 and"),
    ("sdxl_gen_img.py", ["--ckpt", "x.safetensors", "--prompt", "a cat", "--scale", "nan"],
     "error: --scale nan: must be a finite number"),
])
def test_number_errors_exit_2_with_one_line(tmp_path, script, argv, message):
    proc = run_tool(script, *argv, "--outdir" if script == "sdxl_gen_img.py" else "--output_dir",
                    tmp_path / "out", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(message)
    assert not (tmp_path / "out").exists()


# A bad option of the trainer or the generator is reported before MindSpore is imported (its
# import alone is about 2 s): what the process had imported when it stopped.
_IMPORTED_AT_THE_ERROR = """
import sys
from library.errors import UserError
import {script}
try:
    {script}.main({argv!r})
except (UserError, SystemExit) as e:
    print(type(e).__name__, e, "mindspore" in sys.modules)
"""
_TRAIN = ["--network_module", "networks.lora", "--pretrained_model_name_or_path", "{model}",
          "--output_dir", "{out}", "--train_data_dir", "{out}"]


@pytest.mark.parametrize("script, argv, error", [
    ("sdxl_train_network", _TRAIN + ["--optimizer_type", "DAdaptAdam"],
     "UserError --optimizer_type DAdaptAdam is not supported"),
    ("sdxl_train_network", _TRAIN + ["--network_args", "conv_dimm=4"],
     "UserError unknown network_args for networks.lora: conv_dimm"),
    ("sdxl_gen_img", ["--ckpt", "{model}", "--outdir", "{out}", "--prompt", "a cat --w 60"],
     "SystemExit 2"),
])
def test_bad_options_fail_before_mindspore_is_imported(tmp_path, script, argv, error):
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"")          # the checks that fail here do not read it
    argv = [a.format(model=model, out=tmp_path / "out") for a in argv]
    code = _IMPORTED_AT_THE_ERROR.format(script=script, argv=argv)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.stdout.startswith(error) and proc.stdout.rstrip().endswith("False"), \
        proc.stdout + proc.stderr[-2000:]

def test_config_file_numbers_are_checked_too(tmp_path):
    from library.training.args import parse_args
    cfg = tmp_path / "train.toml"
    cfg.write_text("[training]\nnetwork_dim = 0\n")
    with pytest.raises(UserError, match="^--network_dim 0: must be 1 or more"):
        parse_args(["--config_file", str(cfg)])


@pytest.mark.parametrize("network_args, fragment", [
    (["conv_dim=abc"], "network_args conv_dim='abc': expected an integer"),
    (["conv_dim=-4"], "network_args conv_dim='-4': each value must be 0 or more"),
    (["rank_dropout=1.5"], "network_args rank_dropout='1.5': each value must be in [0, 1)"),
    (["conv_alpha=nan"], "network_args conv_alpha='nan'"),
    (["block_dims=" + ",".join(["4"] * 22 + ["-1"])], "network_args block_dims="),
])
def test_network_args_numbers_are_checked_before_the_model_loads(tmp_path, fake_model,
                                                                 network_args, fragment):
    from library.training.args import parse_args
    from library.training.plan import prepare
    _, args = parse_args(["--pretrained_model_name_or_path", str(fake_model), "--network_module",
                          "networks.lora", "--output_dir", str(tmp_path / "out"),
                          "--network_args", *network_args])
    with pytest.raises(UserError) as caught:
        prepare(args)
    assert str(caught.value).startswith(fragment)


# --- 5. a LoRA with NaN or inf weights --------------------------------------------------------

@pytest.fixture
def nan_lora(tmp_path):
    from library.safetensors_io import write_safetensors
    down = "lora_unet_input_blocks_4_1_proj_in.lora_down.weight"
    tensors = {down: np.ones((4, 8), np.float32),
               down.replace("down", "up"): np.ones((8, 4), np.float32),
               "lora_unet_input_blocks_4_1_proj_in.alpha": np.array(4, np.float32)}
    tensors[down.replace("down", "up")][3, 1] = np.inf
    path = tmp_path / "diverged.safetensors"
    write_safetensors(path, tensors, dtype="float16")
    return path


def test_a_non_finite_lora_is_refused_by_trainer_generator_and_loader(tmp_path, fake_model,
                                                                      nan_lora):
    from library.generation.cli import check_args
    from library.training.args import parse_args
    from library.training.plan import prepare
    from networks.lora import load_lora_file
    from library.generation.args import setup_parser
    fragment = (f"{nan_lora}: tensor lora_unet_input_blocks_4_1_proj_in.lora_up.weight holds NaN "
                "or infinite values")
    _, args = parse_args(["--pretrained_model_name_or_path", str(fake_model), "--network_module",
                          "networks.lora", "--output_dir", str(tmp_path / "out"),
                          "--network_weights", str(nan_lora)])
    for refuse in (lambda: prepare(args), lambda: load_lora_file(nan_lora), lambda: check_args(
            setup_parser().parse_args(["--ckpt", "x.safetensors", "--prompt", "a cat",
                                       "--network_module", "networks.lora",
                                       "--network_weights", str(nan_lora)]))):
        with pytest.raises(UserError) as caught:
            refuse()
        assert str(caught.value).startswith(fragment)


# --- 6. paths that would fail after the expensive work --------------------------------------

@pytest.fixture
def fake_model(tmp_path):
    from library.safetensors_io import write_safetensors
    path = tmp_path / "model.safetensors"
    write_safetensors(path, {"x": np.zeros(1, np.float32)})
    return path


@pytest.mark.parametrize("extra, fragment", [
    (["--output_name", "sub/name"], "--output_name sub/name: a file name, not a path"),
    (["--logging_dir", "{file}/logs"], "--logging_dir {file}/logs: {file} is a file, not a folder"),
])
def test_trainer_paths_are_checked_before_the_model_loads(tmp_path, fake_model, extra, fragment):
    from library.training.args import parse_args
    from library.training.plan import prepare
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    extra = [e.format(file=blocker) for e in extra]
    _, args = parse_args(["--pretrained_model_name_or_path", str(fake_model), "--network_module",
                          "networks.lora", "--output_dir", str(tmp_path / "out"), *extra])
    with pytest.raises(UserError) as caught:
        prepare(args)
    assert str(caught.value).startswith(fragment.format(file=blocker))


def test_generator_outdir_under_a_file_is_refused_before_generating(tmp_path):
    from library.generation.cli import check_args
    from library.generation.args import setup_parser
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    args = setup_parser().parse_args(["--ckpt", "x.safetensors", "--prompt", "a cat",
                                      "--outdir", str(blocker / "images")])
    with pytest.raises(UserError, match="--outdir .*: .*a_file is a file, not a folder"):
        check_args(args)


@pytest.mark.parametrize("save_to, fragment", [
    ("missing/m.safetensors", "the folder {tmp}/missing does not exist"),
    (".", "give a file name ending in .safetensors"),
    ("m.ckpt", "give a file name ending in .safetensors"),
])
def test_merge_save_to_is_refused_before_the_merge(tmp_path, save_to, fragment):
    proc = run_tool("tools/merge_lora.py", "--models", tmp_path / "a.safetensors", "--save_to",
                    tmp_path / save_to, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert fragment.format(tmp=tmp_path) in proc.stderr
    assert os.listdir(tmp_path) == []


# --- 7-10. dataset files: encodings, JSON types, silent accepts, 16-bit PNGs ----------------

def _png(path, size=(64, 64), color=(200, 30, 30)):
    from PIL import Image
    Image.new("RGB", size, color).save(path)
    return path


def _group(tmp_path, is_dreambooth=True, **subset_kw):
    from library.data.config_schema import DatasetConfig, SubsetConfig
    from library.data.dataset import build_dataset_groups
    sub = SubsetConfig(where="datasets[0].subsets[0]", **subset_kw)
    config = DatasetConfig(subsets=(sub,), is_dreambooth=is_dreambooth, resolution=(64, 64),
                           enable_bucket=False, where="datasets[0]")
    return build_dataset_groups([config])[0]


def test_a_toml_with_a_byte_order_mark_is_read_and_latin_1_is_named(tmp_path):
    from library.data.config import load_config_file
    from library.training.args import parse_args
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b"\xef\xbb\xbf[general]\nresolution = 64\n")
    assert load_config_file(str(bom)) == {"general": {"resolution": 64}}
    latin = tmp_path / "latin.toml"
    latin.write_bytes("[general]\n# caf\u00e9 images\nresolution = 64\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"dataset config .*latin\.toml is not UTF-8 text .*"
                                        "re-save it as UTF-8"):
        load_config_file(str(latin))
    cfg = tmp_path / "train.toml"
    cfg.write_bytes(b"\xef\xbb\xbfnetwork_dim = 8\n")
    assert parse_args(["--config_file", str(cfg)])[1].network_dim == 8
    from library.generation.prompts import read_prompt_file
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"\xef\xbb\xbfa cat --n dog\n")
    assert read_prompt_file(str(prompts))[0].prompt == "a cat"


def test_a_caption_file_with_a_byte_order_mark_or_only_whitespace(tmp_path):
    from library.data.captions import read_caption_file
    img = _png(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfa red square\n")
    assert read_caption_file(str(img), ".txt", False) == "a red square"
    (tmp_path / "a.txt").write_text("  \n\t\n")
    with pytest.raises(UserError, match=r"a\.txt is empty; write a caption or delete the file"):
        read_caption_file(str(img), ".txt", False)


@pytest.mark.parametrize("entry, fragment", [
    ({"caption": 5}, "entry 'a.png': \"caption\" should be text, got 5"),
    ({"tags": ["red", "square"]}, "entry 'a.png': \"tags\" should be text, got ['red', 'square']"),
    ("a red square", "entry 'a.png': expected an object"),
    ({}, "entry 'a.png' has neither a caption nor tags"),
    ({"caption": " ", "tags": ""}, "entry 'a.png' has neither a caption nor tags"),
])
def test_metadata_entries_of_the_wrong_type_or_empty_are_named(tmp_path, entry, fragment):
    _png(tmp_path / "a.png")
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"a.png": entry}))
    with pytest.raises(UserError) as caught:
        _group(tmp_path, is_dreambooth=False, image_dir=str(tmp_path), metadata_file=str(meta))
    assert "meta.json" in str(caught.value) and fragment in str(caught.value)


def test_images_without_a_metadata_entry_and_dangling_links_are_warned_about(tmp_path, caplog):
    for name in ("a.png", "b.png", "c.png"):
        _png(tmp_path / name)
    os.symlink(tmp_path / "gone.png", tmp_path / "link.png")
    meta = tmp_path / "meta.json"
    meta.write_bytes(b"\xef\xbb\xbf" + json.dumps({"a.png": {"caption": "red"}}).encode())
    group = _group(tmp_path, is_dreambooth=False, image_dir=str(tmp_path),
                   metadata_file=str(meta))
    assert [os.path.basename(r.path) for _, r in group.records()] == ["a.png"]
    assert "2 image(s) in" in caplog.text and "are not trained: b.png, c.png" in caplog.text
    assert "1 image link(s) point to a missing file and are left out: link.png" in caplog.text


def test_absolute_metadata_keys_with_a_relative_image_dir_are_not_called_unlisted(
        tmp_path, monkeypatch, caplog):
    _png(tmp_path / "a.png")
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({str(tmp_path / "a.png"): {"tags": "red"}}))
    monkeypatch.chdir(tmp_path)
    _group(tmp_path, is_dreambooth=False, image_dir=".", metadata_file=str(meta))
    assert "not trained" not in caplog.text


def test_a_16_bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    from PIL import Image
    from library.data.images import load_image
    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)     # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    pixels = load_image(str(tmp_path / "g16.png"))
    assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8
    expected = np.round(ramp.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert np.array_equal(pixels[..., 0], expected) and np.array_equal(pixels[..., 2], expected)


# --- 11. --resume onto a dataset that changed ---------------------------------------------------

def test_resume_names_what_changed_in_the_dataset_and_how_the_position_maps(tmp_path):
    from library.data.fingerprint import dataset_changes, dataset_record
    folder = tmp_path / "img"
    folder.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        _png(folder / name)
    saved = json.loads(json.dumps(dataset_record(_group(folder, image_dir=str(folder),
                                                         class_tokens="sks"))))   # as stored
    same = _group(folder, image_dir=str(folder), class_tokens="sks")
    assert dataset_changes(saved, same, {"epoch": 2, "batch": 1}) == []

    os.unlink(folder / "c.png")
    _png(folder / "b.png", (64, 64), (0, 0, 0))
    os.utime(folder / "b.png", ns=(1, 1))
    for name in ("d.png", "e.png"):
        _png(folder / name)
    changed = _group(folder, image_dir=str(folder), class_tokens="sks")
    lines = dataset_changes(saved, changed, {"epoch": 2, "batch": 1})
    assert len(lines) == 2
    assert f"images 2 added ({folder / 'd.png'}, {folder / 'e.png'}); 1 removed " \
           f"({folder / 'c.png'}); 1 changed ({folder / 'b.png'})" in lines[0]
    assert "the saved run had 3 batches per epoch, this one has 4: the saved position, batch 1 " \
           "of epoch 2, continues at batch 1 of 4" in lines[1]
    assert "is past this run's 4, so epoch 2 counts as done" in dataset_changes(
        saved, changed, {"epoch": 2, "batch": 7})[1]


# --- 12. byte-identical images with --cache_latents_to_disk -----------------------------------

def test_identical_images_in_two_repeat_folders_train_from_the_disk_cache(tmp_path):
    import shutil
    from library.data import cache as C
    from test_data_cache import FakeVAE, group_of, make_images, subset
    a = make_images(tmp_path / "a", [(64, 64)])
    (tmp_path / "b").mkdir()
    shutil.copy(a / "000.png", tmp_path / "b" / "000.png")
    g = group_of([subset(a), subset(tmp_path / "b")])
    vae = FakeVAE()
    first = C.build_latent_cache(g, vae, "vae", to_disk=True, progress=False)
    assert vae.images == 1      # one content, encoded once
    got = [first.get(rec) for _, rec in g.records()]
    assert len(got) == 2 and np.array_equal(got[0], got[1])
    again = C.build_latent_cache(g, FakeVAE(), "vae", to_disk=True, progress=False)
    assert again.computed == 0 and all(np.array_equal(again.get(rec), got[0])
                                       for _, rec in g.records())
