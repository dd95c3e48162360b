"""The Linear layers' hand-written backward (layers._Linear.bprop) against autodiff of the plain
formula (x @ w.T + b with numpy-style matmul), in PyNative, in a static graph and in a graph
with open batch and length (the trainer's dynamic-shape step), for 2-D and 3-D inputs, with and
without a bias; and the operators it saves in a dynamic graph."""

import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, ops, Tensor, Parameter

from library import layers


class _Net(nn.Cell):
    """Two Linears in a row, the first frozen (as a model's own weight under LoRA)."""

    def __init__(self, linear, c, bias, seed=2):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.linear = linear
        self.frozen = Parameter(Tensor(rng.standard_normal((c, c)).astype(np.float32) * 0.3),
                                name="frozen", requires_grad=False)
        self.w = Parameter(Tensor(rng.standard_normal((5, c)).astype(np.float32) * 0.3), name="w")
        self.b = Parameter(Tensor(rng.standard_normal(5).astype(np.float32)), name="b") if bias else None

    def construct(self, x, probe):
        h = self.linear(x, self.frozen, None)
        return (self.linear(h * h, self.w, self.b) * probe).sum()


def _reference(x, w, b):
    y = ops.matmul(x, w.T)
    return y if b is None else y + b


def _grads(linear, x, probe, bias, mode, dynamic=False):
    net = _Net(linear, x.shape[-1], bias)
    fn = ms.value_and_grad(net, grad_position=0, weights=net.trainable_params())
    if mode == ms.GRAPH_MODE:
        dims = [None] * (x.ndim - 1)
        fn = ms.jit(fn, input_signature=(Tensor(shape=dims + [x.shape[-1]], dtype=ms.float32),
                                         Tensor(shape=dims + [5], dtype=ms.float32))
                    if dynamic else None)
    value, (dx, weights) = fn(x, probe)
    return [value.asnumpy(), dx.asnumpy(), *(g.asnumpy() for g in weights)]


@pytest.mark.parametrize("mode,dynamic", [(ms.PYNATIVE_MODE, False), (ms.GRAPH_MODE, False),
                                          (ms.GRAPH_MODE, True)])
@pytest.mark.parametrize("shape", [(3, 8), (2, 7, 8)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_backward_matches_autodiff(mode, dynamic, shape, bias):
    rng = np.random.default_rng(1)
    x = Tensor(rng.standard_normal(shape).astype(np.float32))
    probe = Tensor(rng.standard_normal(shape[:-1] + (5,)).astype(np.float32))
    ours = _grads(layers.linear, x, probe, bias, mode, dynamic)
    ref = _grads(_reference, x, probe, bias, mode, dynamic)
    assert len(ours) == 3 + bias and np.abs(ref[1]).max() > 1e-2
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


def test_dynamic_grad_graph_has_no_broadcasting_matmul():
    """Autodiff of Dense under open shapes builds MatMulExt (the broadcasting matmul: BroadcastTo,
    ReduceSum and ShapeCalc kernels at every launch) and twice the reshapes; ours two MatMuls."""
    from mindspore import mint
    from library.training.graph_stats import graph_op_counts

    class _Step(nn.Cell):
        def __init__(self, linear):
            super().__init__()
            self.net = _Net(linear, 8, bias=True)
            self.grad = ms.value_and_grad(self.net, grad_position=0,
                                          weights=self.net.trainable_params())

        def construct(self, x, probe):
            return self.grad(x, probe)

    inputs = (Tensor(shape=[None, None, 8], dtype=ms.float32),
              Tensor(shape=[None, None, 5], dtype=ms.float32))
    ours = graph_op_counts(_Step(layers.linear), *inputs)
    autodiff = graph_op_counts(_Step(mint.nn.functional.linear), *inputs)
    assert autodiff["MatMulExt"] >= 1 and "MatMulExt" not in ours and ours["MatMul"] == 3
    assert ours["Reshape"] < autodiff["Reshape"] and sum(ours.values()) < sum(autodiff.values())
