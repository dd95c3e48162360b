"""The process-wide MindSpore setup of library/device.py."""

import mindspore as ms
import pytest


def test_the_cpu_runtime_is_given_its_dispatch_threads():
    # conftest configures the device as the CLIs do; MindSpore refuses a second setting, which
    # is how a test can see that the first one was made (left unset, 2 cores get one actor
    # thread and a graph step runs twice as slow)
    with pytest.raises(RuntimeError, match="repeatedly"):
        ms.runtime.dispatch_threads_num(2)
