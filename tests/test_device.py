"""The process-wide MindSpore setup of library/device.py."""

import os

import mindspore as ms
import pytest


def test_the_cpu_runtime_is_given_its_dispatch_threads():
    # conftest configures the device as the CLIs do; MindSpore refuses a second setting, which
    # is how a test can see that the first one was made (left unset, 2 cores get one actor
    # thread and a graph step runs twice as slow)
    with pytest.raises(RuntimeError, match="repeatedly"):
        ms.runtime.dispatch_threads_num(2)


def test_the_generator_keeps_mindspore_s_dispatch_default(tmp_path):
    # its forward-only UNet graph runs 2.7x slower with the trainer's setting (library/device.py)
    import subprocess
    import sys
    from conftest import ROOT
    # a missing model fails at its load, after the device is configured
    missing = tmp_path / "missing.safetensors"
    script = (
        "import mindspore as ms, sdxl_gen_img\n"
        "try:\n"
        f"    sdxl_gen_img.main(['--ckpt', {str(missing)!r}, '--outdir', {str(tmp_path)!r},\n"
        "                       '--prompt', 'x'])\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 2, exit.code\n"
        "ms.runtime.dispatch_threads_num(2)\n"
        "print('left unset')\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0 and "left unset" in proc.stdout, proc.stderr[-2000:]
    assert "model not found" in proc.stderr, proc.stderr[-2000:]     # the load was reached


@pytest.mark.parametrize("version, target, warned", [
    ("2.7.1", "CPU", False), ("2.8.0", "CPU", False), ("2.9.0", "CPU", True),
    ("2.10.0", "CPU", True), ("2.10.0", "Ascend", False),
])
def test_mindspore_releases_with_a_slow_cpu_convolution_are_named(version, target, warned):
    from library.device import slow_cpu_convolution
    warning = slow_cpu_convolution(version, target)
    assert bool(warning) == warned
    if warned:
        assert f"MindSpore {version} on CPU" in warning and "2.7.1 or 2.8.0" in warning
