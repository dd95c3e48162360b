"""Shared fixtures: the tiny SDXL checkpoint is made once per session, from the same tool and
seed that the PyTorch reference fixtures were made from (tools/make_tiny_sdxl.py --seed 0)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"


def _tool_env(env):
    return dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))


# The suite's shared train-step graph: CLI runs that train in graph mode with these options on a
# one-image 64x64 dataset (batch 1) compile the same grad and apply graphs, so all but the first
# load them from the session's compile cache (about 4 s instead of 40 or more). Only options that
# reach no graph (library/training/compile_cache.py, HOST_ONLY_OPTIONS) may differ between them.
SHARED_GRAPH_ARGS = ("--network_module", "networks.lora", "--resolution", "64", "--network_dim", "8",
                     "--network_train_unet_only", "--cache_latents", "--cache_text_encoder_outputs")

# A LoRA on one UNet block only (kohya's block_dims: the middle block's first slot): a PyNative
# CLI run's step then costs seconds, not tens of seconds, for tests about everything but the LoRA.
ONE_BLOCK = "block_dims=" + ",".join("4" if i == 11 else "0" for i in range(23))


def run_tool(*args, check=True, env=None):
    """Run a project script as a user would; returns the CompletedProcess (text mode)."""
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, env=_tool_env(env))
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def randomise_lora(network, seed=0, up_std=0.05):
    """Random lora_up (a fresh one is zero) and a seeded lora_down in place of its unseeded
    init, so that a test's margins are the same from run to run."""
    import numpy as np
    from mindspore import Tensor
    rng = np.random.default_rng(seed)
    for m in network.loras:
        down, up = m.lora_down.weight, m.lora_up.weight
        bound = 1 / np.sqrt(m.fan_in)       # the bound of kohya's kaiming_uniform_(a=sqrt(5))
        down.set_data(Tensor(rng.uniform(-bound, bound, down.shape).astype(np.float32)))
        up.set_data(Tensor(rng.normal(0, up_std, up.shape).astype(np.float32)))


def start_tool(*args, output, env=None):
    """Start a project script in the background (for the test to stop it); its stdout and
    stderr go to the file `output` (a pipe nobody reads could fill up and block it)."""
    with open(output, "w") as sink:
        return subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, stdout=sink,
                                stderr=subprocess.STDOUT, env=_tool_env(env))


@pytest.fixture(scope="session", autouse=True)
def mindspore_runtime():
    """The MindSpore runtime set up as the CLIs set it (library/device.py), for the tests that
    run models in this process."""
    from library import device
    device.configure()


@pytest.fixture(scope="session", autouse=True)
def compile_cache_home(tmp_path_factory):
    """The trainer's compile cache for this test session (never the user's ~/.cache): the runs
    the tests start, in-process or as a CLI, share it, so a graph one test compiled is loaded
    by the next test that compiles the same one; both xdist workers use one folder (the cache
    locks an entry while it is written)."""
    base = tmp_path_factory.getbasetemp()
    home = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "xdg_cache"
    home.mkdir(exist_ok=True)
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(home)
    yield home
    if old is None:
        del os.environ["XDG_CACHE_HOME"]
    else:
        os.environ["XDG_CACHE_HOME"] = old


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny_sdxl.safetensors"
    run_tool("tools/make_tiny_sdxl.py", "--out", path, "--seed", "0")
    return path


@pytest.fixture(scope="session")
def tiny_models(tiny_ckpt):
    from library.models import load_sdxl
    return load_sdxl(tiny_ckpt)
