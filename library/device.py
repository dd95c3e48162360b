"""Where the code runs: device target and execution mode, chosen once per process.

MindSpore keeps this in a global context; every other module asks here instead of reading the
context itself, so that the backend choice lives in one place (see library/layers.py).
"""

import functools
import os

import mindspore as ms

_VALID_TARGETS = ("CPU", "Ascend", "GPU")


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
    if parallel_dispatch and ms.get_context("device_target") == "CPU":
        _set_dispatch_threads()


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
