"""Where the code runs: device target and execution mode, chosen once per process.

MindSpore keeps this in a global context; every other module asks here instead of reading the
context itself, so that the backend choice lives in one place (see library/layers.py).
"""

import functools
import logging
import os

import mindspore as ms

_VALID_TARGETS = ("CPU", "Ascend", "GPU")
logger = logging.getLogger(__name__)


def configure(device_target=None, graph_mode=False, parallel_dispatch=True):
    """Set the device target (default: $MS_DEVICE_TARGET, else MindSpore's own default) and mode.

    `parallel_dispatch` gives a CPU run the trainer's dispatch threads (`_set_dispatch_threads`);
    the generator passes False and keeps MindSpore's default, which runs its forward-only UNet
    graph 2.7x faster here."""
    target = device_target or os.environ.get("MS_DEVICE_TARGET")
    if target:
        if target not in _VALID_TARGETS:
            raise ValueError(f"unknown device target {target!r}; choose one of {_VALID_TARGETS}")
        ms.set_device(target)
    ms.set_context(mode=ms.GRAPH_MODE if graph_mode else ms.PYNATIVE_MODE)
    warning = slow_cpu_convolution(ms.__version__, ms.get_context("device_target"))
    if warning:
        logger.warning(warning)
    if parallel_dispatch and ms.get_context("device_target") == "CPU":
        _set_dispatch_threads()


def slow_cpu_convolution(version, target):
    """The warning for MindSpore releases whose CPU convolution is oneDNN 3's reference kernel.

    2.9.0 and 2.10.0 ship oneDNN 3.x, which runs a plain-layout (NCHW) float32 conv with its
    `jit_uni_ncsp:conv+ref` implementation: 134-150 ms for one 64-channel 3x3 conv at 32x32,
    against 1.8 ms (2.8.0) and 2.4-4 ms (2.7.1) on oneDNN 2's gemm kernel, and the tiny model's
    train step takes 15 s instead of 0.95 (README, "MindSpore versions"). Ascend is unaffected.
    """
    major, minor = (int(part) for part in version.split(".")[:2])
    if target != "CPU" or (major, minor) < (2, 9):
        return None
    return (f"MindSpore {version} on CPU runs convolutions on oneDNN's reference kernel, about "
            f"50x slower than MindSpore 2.7.1 or 2.8.0: install one of those for CPU runs "
            f"(README, \"MindSpore versions\")")


@functools.cache
def _set_dispatch_threads():
    """Give the CPU runtime MindSpore's documented 5 dispatch (actor) threads, at most one per core.

    Left unset, MindSpore sizes the actor pool as 18 % of its kernel threads, so a machine with
    fewer than 11 cores gets a single actor thread; on 2 cores that made a tiny graph step twice as
    slow alone (40 steps: 9.0 s against 4.4 s) and 9x slower when a second trainer shared the
    cores (45 s against 5 s each). MindSpore allows setting this once per process (the cache).
    Forward-only graphs lose instead: the tiny UNet's generation step (256 px, CFG) took 203 ms
    with it against 76 ms without (2026-12-04), and a chain of 40 Linear layers stalled for up to
    a second between calls; so the generator does not set it (training samples, in the trainer's
    process, do run with it).
    """
    ms.runtime.dispatch_threads_num(5)


def device_target():
    """The run's device, also before `configure` has set it."""
    return os.environ.get("MS_DEVICE_TARGET") or ms.get_context("device_target")


def is_ascend():
    return device_target() == "Ascend"


def has_bf16_matmul():
    """Whether bfloat16 runs here: MindSpore's CPU backend has no bfloat16 matmul kernel (2.7), so
    --mixed_precision bf16, --full_bf16 and the generator's --bf16 are refused on CPU alone."""
    return device_target() != "CPU"
