"""Full-size SDXL forward passes (about 10 GiB of RAM and a minute each on CPU): `make test-full`."""

import numpy as np
import pytest
from mindspore import Tensor

from library.models import build_sdxl

pytestmark = pytest.mark.full


@pytest.fixture(scope="module")
def base():
    return build_sdxl("sdxl_base", init=True)


def test_full_size_unet_forward(base):
    rng = np.random.default_rng(0)
    x = Tensor(rng.standard_normal((1, 4, 32, 32), dtype=np.float32))
    ctx = Tensor(rng.standard_normal((1, 77, 2048), dtype=np.float32))
    y = Tensor(rng.standard_normal((1, 2816), dtype=np.float32))
    out = base.unet(x, Tensor(np.array([500.0], np.float32)), ctx, y).asnumpy()
    assert out.shape == (1, 4, 32, 32) and np.isfinite(out).all() and out.std() > 0


def test_full_size_text_encoders_and_vae(base):
    ids = Tensor(np.array([[49406, 320, 1125, 539, 320, 2368, 49407] + [0] * 70], np.int32))
    last, pooled, hidden = base.text_encoder2(ids)
    assert last.shape == (1, 77, 1280) and pooled.shape == (1, 1280) and len(hidden) == 33
    _, _, hidden1 = base.text_encoder1(ids)
    assert len(hidden1) == 13 and hidden1[11].shape == (1, 77, 768)
    image = base.vae.decode(Tensor(np.zeros((1, 4, 8, 8), np.float32)))
    assert image.shape == (1, 3, 64, 64)
