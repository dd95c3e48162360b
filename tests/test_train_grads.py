"""Gradient clipping against torch.nn.utils.clip_grad_norm_
(tests/fixtures/train_golden/clip_grad_norm.json) and the dynamic loss scaler's rules."""

import json
from pathlib import Path

import numpy as np
import mindspore as ms
from mindspore import nn, ops, Parameter, Tensor

from library.training.grad_ops import DynamicLossScaler, clip_to_norm, global_norm, scale_all
from library.training.optimizer_cells import ParamGroup, SGDNesterov

GOLDEN = json.loads((Path(__file__).parent / "fixtures/train_golden/clip_grad_norm.json").read_text())


class Clip(nn.Cell):
    @ms.jit
    def construct(self, grads, max_norm):
        norm = global_norm(grads)
        return clip_to_norm(grads, norm, max_norm), norm


def test_global_norm_and_clipping_match_torch():
    clip = Clip()
    grads = ms.mutable(tuple(Tensor(np.asarray(g, np.float32)) for g in GOLDEN["grads"]))
    for case in GOLDEN["cases"]:
        clipped, norm = clip(grads, Tensor(case["max_norm"], ms.float32))
        np.testing.assert_allclose(norm.asnumpy(), case["total_norm"], rtol=1e-6)
        for got, want in zip(clipped, case["clipped"]):
            np.testing.assert_allclose(got.asnumpy(), np.asarray(want, np.float32), rtol=1e-6, atol=1e-7)


class ScaledUpdate(nn.Cell):
    """The loss-scale half of a train step: unscale, check (from the global norm), update only
    if finite, adjust."""

    def __init__(self, optimizer, scaler):
        super().__init__(auto_prefix=False)
        self.optimizer, self.scaler = optimizer, scaler

    @ms.jit
    def construct(self, scaled_grads, lrs):
        grads = scale_all(self.optimizer.layout.flatten(scaled_grads), 1 / self.scaler.scale)
        finite = ops.isfinite(global_norm(grads))
        if finite:
            self.optimizer(grads, lrs)
        return self.scaler.update(finite)


def test_loss_scaler_skips_overflow_steps_halves_and_grows():
    w = Parameter(Tensor(np.ones(3, np.float32)), name="scaler_test.w")
    scaler = DynamicLossScaler(init_scale=8.0, growth_interval=2)
    step = ScaledUpdate(SGDNesterov([ParamGroup([w], 0.1, "all")], momentum=0.5), scaler)
    assert float(scaler.scale_loss(Tensor(1.5, ms.float32)).asnumpy()) == 12.0
    lrs = Tensor(np.array([0.1], np.float32))
    history = []
    for grad in ([8.0, 8.0, 8.0], [np.inf, 0, 0], [4.0, 4.0, 4.0], [4.0, np.nan, 4.0],
                 [4.0, 4.0, 4.0], [4.0, 4.0, 4.0], [8.0, 8.0, 8.0]):
        before = w.asnumpy().copy()
        finite = bool(step(ms.mutable((Tensor(np.asarray(grad, np.float32)),)), lrs).asnumpy())
        history.append((finite, float(scaler.scale.asnumpy()), int(scaler.good_steps.asnumpy())))
        assert finite == bool(np.isfinite(grad).all())
        assert np.isfinite(w.asnumpy()).all()
        if not finite:
            np.testing.assert_array_equal(w.asnumpy(), before)  # the update was skipped
    assert history == [(True, 8.0, 1), (False, 4.0, 0), (True, 4.0, 1), (False, 2.0, 0),
                       (True, 2.0, 1), (True, 4.0, 0), (True, 4.0, 1)]
    assert int(step.optimizer.step_count.asnumpy()) == 5
