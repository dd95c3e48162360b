"""Where the code runs: device target and execution mode, chosen once per process.

MindSpore keeps this in a global context; every other module asks here instead of reading the
context itself, so that the backend choice lives in one place (see library/layers.py).
"""

import os

import mindspore as ms

_VALID_TARGETS = ("CPU", "Ascend", "GPU")


def configure(device_target=None, graph_mode=False):
    """Set the device target (default: $MS_DEVICE_TARGET, else MindSpore's own default) and mode."""
    target = device_target or os.environ.get("MS_DEVICE_TARGET")
    if target:
        if target not in _VALID_TARGETS:
            raise ValueError(f"unknown device target {target!r}; choose one of {_VALID_TARGETS}")
        ms.set_device(target)
    ms.set_context(mode=ms.GRAPH_MODE if graph_mode else ms.PYNATIVE_MODE)


def device_target():
    return ms.get_context("device_target")


def is_ascend():
    return device_target() == "Ascend"
