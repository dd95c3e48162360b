"""layers.add and layers.mul: the same values and gradients as `a + b` and `a * b`, and, under
open shapes (the trainer's dynamic-shape step), none of the broadcast-reduction kernels the
operators' generic gradient adds."""

import numpy as np
import mindspore as ms
import pytest
from mindspore import nn, Tensor

from library import layers
from library.training.graph_stats import graph_op_counts


def _plain_add(a, b):
    return a + b


def _plain_mul(a, b):
    return a * b


class _Loss(nn.Cell):
    def __init__(self, op):
        super().__init__()
        self.op = op

    def construct(self, a, b, probe):
        return (self.op(a, b) * probe).sum()


class _Grad(nn.Cell):
    def __init__(self, op):
        super().__init__()
        self.grad = ms.value_and_grad(_Loss(op), grad_position=(0, 1))

    def construct(self, a, b, probe):
        return self.grad(a, b, probe)


def _run(op, arrays, mode):
    cell = _Grad(op)
    tensors = [Tensor(x) for x in arrays]
    if mode == "dynamic":
        cell.set_inputs(*[Tensor(shape=[None, None, x.shape[-1]], dtype=ms.float32)
                          for x in arrays])
    step = cell if mode == "pynative" else ms.jit(cell.construct)
    loss, grads = step(*tensors)
    return [loss.asnumpy()] + [g.asnumpy() for g in grads]


@pytest.mark.parametrize("ours,plain", [(layers.add, _plain_add), (layers.mul, _plain_mul)],
                         ids=["add", "mul"])
@pytest.mark.parametrize("mode", ["pynative", "static", "dynamic"])
def test_value_and_gradients_match_the_operator(ours, plain, mode):
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((2, 5, 3)).astype(np.float32) for _ in range(3)]
    for got, want in zip(_run(ours, arrays, mode), _run(plain, arrays, mode)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("ours,plain", [(layers.add, _plain_add), (layers.mul, _plain_mul)],
                         ids=["add", "mul"])
def test_dynamic_gradient_has_no_broadcast_reduction(ours, plain):
    inputs = [Tensor(shape=[None, None, 3], dtype=ms.float32) for _ in range(3)]
    counts, plain_counts = graph_op_counts(_Grad(ours), *inputs), graph_op_counts(_Grad(plain), *inputs)
    # the loss's own sum is one ReduceSum in both; the operator's gradient adds one per input
    assert counts["ReduceSum"] == 1 and plain_counts["ReduceSum"] == 3
    assert counts["ShapeCalc"] < plain_counts["ShapeCalc"]
