"""The UNet attention's hand-written backward (layers._HeadAttention.bprop) against autodiff of
the plain formula (layers.math_attention: matmul + softmax), in PyNative and graph mode,
self- and cross-attention, with the inputs' gradients and a LoRA-style weight gradient."""

import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, ops, Tensor, Parameter

from library import layers


class _Net(nn.Cell):
    """q from x (a projection with a trainable weight), k, v from the context."""

    def __init__(self, attend, c, heads, seed):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.w = Parameter(Tensor(rng.standard_normal((c, c)).astype(np.float32) * 0.3), name="w")
        self.attend = attend
        self.heads = heads

    def construct(self, x, ctx, probe):
        q = ops.matmul(x, self.w)
        return (self.attend(q, ctx * 0.7, ctx * 1.3) * probe).sum()


class _Reference(nn.Cell):
    def __init__(self, heads):
        super().__init__()
        self.heads = heads

    def construct(self, q, k, v):
        return layers.math_attention(q, k, v, self.heads)


@pytest.mark.parametrize("mode", [ms.PYNATIVE_MODE, ms.GRAPH_MODE])
@pytest.mark.parametrize("n,m", [(24, 24), (24, 7)])
def test_attention_backward_matches_autodiff(mode, n, m):
    c, heads = 16, 4
    rng = np.random.default_rng(1)
    x = Tensor(rng.standard_normal((2, n, c)).astype(np.float32))
    ctx = Tensor(rng.standard_normal((2, m, c)).astype(np.float32))
    probe = Tensor(rng.standard_normal((2, n, c)).astype(np.float32))
    grads = []
    for attend in (layers.Attention(heads), _Reference(heads)):
        net = _Net(attend, c, heads, seed=2)
        fn = ms.value_and_grad(net, grad_position=(0, 1), weights=net.trainable_params())
        if mode == ms.GRAPH_MODE:
            fn = ms.jit(fn)
        value, (inputs, weights) = fn(x, ctx, probe)
        grads.append([value.asnumpy(), *(g.asnumpy() for g in inputs), weights[0].asnumpy()])
    ours, ref = grads
    assert np.abs(ref[1]).max() > 1e-2       # a gradient that is not trivially zero
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())
