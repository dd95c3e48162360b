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

from conftest import ROOT, run_tool
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
    assert [r.getMessage() for r in caplog.records] == [
        "could not save out/a-state: No space left on device"]
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
    fake = SimpleNamespace(grad_buffers=[], get_parameters=lambda: [])
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
])
def test_generator_numbers_out_of_range(argv, fragment):
    from library.generation.cli import check_args
    from sdxl_gen_img import setup_parser
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
