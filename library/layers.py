"""The one op layer the models are built from.

MindSpore 2.7's `mint` ops are Ascend-first and about 25 of them have no CPU kernel (Conv2DExt,
LayerNormExt, GeluExt, ...). Every op used here has a kernel on CPU and on Ascend, in PyNative and
graph mode. The single backend choice is attention: Ascend's fused `flash_attention_score`, math
attention elsewhere. Models call these and never look at the device themselves.

Parameters are named `weight` / `bias` like PyTorch's, so a model's parameter names are its
checkpoint keys.
"""

import math

import numpy as np
import mindspore as ms
from mindspore import nn, ops, mint, Parameter, Tensor
from mindspore.common.initializer import initializer, HeUniform, Uniform, Normal

from library import device


class Linear(nn.Dense):
    """PyTorch's Linear (nn.Dense's parameters and init) as the one `Dense` primitive, which takes
    any number of leading axes. nn.Dense reshapes to 2-D and back around a MatMul: three ops and
    two shape reads per call, and in PyNative each shape read waits for every queued op."""

    def __init__(self, in_features, out_features, bias=True, weight_init=None, dtype=ms.float32):
        super().__init__(in_features, out_features, weight_init=weight_init, has_bias=bias,
                         dtype=dtype)

    def construct(self, x):
        return linear(x, self.weight, self.bias)


def linear(x, weight, bias=None):
    """x @ weight.T (+ bias) over x's last axis."""
    return _LINEAR(x, weight) if bias is None else _LINEAR_BIAS(x, weight, bias)


class _Linear(nn.Cell):
    """The `Dense` primitive with its gradient written out (`bprop`) as two 2-D MatMuls.

    MindSpore derives Dense's gradient through its generic matmul rule, which checks for
    broadcasting: under dynamic shapes that check runs at every call (BatchMatMul, BroadcastTo,
    ReduceSum and ShapeCalc kernels per Linear), which made a dynamic-shape train step 2.3-2.6x the
    static one, and in a static graph it adds transposes. Gradients nothing uses (a frozen
    weight's, an input's that needs none) are pruned by the graph compiler as autodiff's are.
    PyNative runs this bprop as Python, about 20 % slower per tiny step than autodiff's (the
    fallback mode pays for the default's speed; docs/training.md)."""

    def construct(self, x, weight):
        return mint.nn.functional.linear(x, weight)

    def bprop(self, x, weight, out, dout):
        dout_2d = dout.reshape(-1, weight.shape[0])
        return _input_grad(x, weight, dout_2d), _weight_grad(x, weight, dout_2d)


class _LinearBias(_Linear):
    def construct(self, x, weight, bias):
        if x.ndim == 2:
            # MatMul then BiasAdd: with open shapes `Dense` adds its bias with a broadcasting Add,
            # 5x slower per launch on CPU than the BiasAdd kernel
            return _BIAS_ADD(_MATMUL_NT(x, weight), bias)
        return mint.nn.functional.linear(x, weight, bias)

    def bprop(self, x, weight, bias, out, dout):
        dout_2d = dout.reshape(-1, weight.shape[0])
        return (_input_grad(x, weight, dout_2d), _weight_grad(x, weight, dout_2d),
                dout_2d.sum(0))


_MATMUL, _MATMUL_TN, _MATMUL_NT = ops.MatMul(), ops.MatMul(transpose_a=True), ops.MatMul(transpose_b=True)
_BIAS_ADD = ops.BiasAdd()


def _input_grad(x, weight, dout_2d):
    return _MATMUL(dout_2d, weight).reshape(x.shape)


def _weight_grad(x, weight, dout_2d):
    return _MATMUL_TN(dout_2d, x.reshape(-1, weight.shape[1]))


_LINEAR, _LINEAR_BIAS = _Linear(), _LinearBias()


def add(*xs):
    """The sum of same-shape tensors, as one AddN: its gradient is `dout` for every input.

    `a + b` may broadcast, so its gradient reduces `dout` to each input's shape; with open
    shapes (the trainer's one dynamic graph) the compiler cannot see that the shapes match and
    every add runs Shape, ShapeCalc, ReduceSum and Reshape kernels at each step (two of each per
    residual and LoRA add: about 1,500 launches of a tiny UNet step)."""
    return _ADD_N(list(xs))


class _SameShapeMul(nn.Cell):
    """a * b for tensors of one shape, with the gradient written out (`bprop`) for the reason
    `add` gives: no broadcast reduction under open shapes."""

    def construct(self, a, b):
        return a * b

    def bprop(self, a, b, out, dout):
        return dout * b, dout * a


_ADD_N, mul = ops.AddN(), _SameShapeMul()


class Conv2d(nn.Conv2d):
    """PyTorch-style conv. `padding` is an int or MindSpore's (top, bottom, left, right).

    PyTorch's default init (kaiming-uniform with a=sqrt(5), bias from the fan-in bound), so a
    randomly initialised model behaves like the reference one.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True):
        bound = 1 / math.sqrt(in_channels * kernel_size * kernel_size)
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, pad_mode="pad",
                         padding=padding, has_bias=bias, weight_init=HeUniform(math.sqrt(5)),
                         bias_init=Uniform(bound) if bias else None)


class GroupNorm(nn.Cell):
    """GroupNorm computed in float32 whatever the input dtype (SGM's GroupNorm32 does the same)."""

    def __init__(self, num_groups, num_channels, eps=1e-5):
        super().__init__()
        self.num_groups = num_groups
        self.eps = eps
        self.weight = Parameter(initializer("ones", (num_channels,), ms.float32), name="weight")
        self.bias = Parameter(initializer("zeros", (num_channels,), ms.float32), name="bias")

    def construct(self, x):
        out = mint.nn.functional.group_norm(x.astype(ms.float32), self.num_groups,
                                            self.weight.astype(ms.float32),
                                            self.bias.astype(ms.float32), self.eps)
        return out.astype(x.dtype)


class LayerNorm(nn.Cell):
    """LayerNorm over the last axis (the legacy primitive: `mint`'s has no CPU kernel)."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.weight = Parameter(initializer("ones", (dim,), ms.float32), name="weight")
        self.bias = Parameter(initializer("zeros", (dim,), ms.float32), name="bias")
        self.norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)

    def construct(self, x):
        return self.norm(x, self.weight.astype(x.dtype), self.bias.astype(x.dtype))[0]


class Embedding(nn.Cell):
    """A lookup table with a PyTorch-named `weight` (nn.Embedding calls it `embedding_table`)."""

    def __init__(self, num, dim):
        super().__init__()
        self.weight = Parameter(initializer(Normal(0.02), (num, dim), ms.float32), name="weight")

    def construct(self, ids):
        return ops.gather(self.weight, ids, 0)


def silu(x):
    return x * ops.sigmoid(x)


def gelu(x):
    """The exact (erf) GELU, PyTorch's default. `ops.gelu` divides by sqrt(2) computed at each
    call, a broadcasting Div that under open shapes is several times slower on CPU than this
    multiply by the constant."""
    return x * (ops.erf(x * 0.7071067811865476) + 1.0) * 0.5


def quick_gelu(x):
    return x * ops.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": gelu, "quick_gelu": quick_gelu}


def upsample_nearest_2x(x):
    """Nearest 2x upsampling of (B, C, H, W): each value stacked twice along W, then along H.

    Written with stack and reshape, whose output shapes MindSpore infers at compile time: a
    static graph stays static after an upsample (a resize to a size computed in the graph, as
    before, left every later kernel of the decoder with unknown H, W, re-inferred at each launch),
    and a graph with dynamic H, W still works (the shape arithmetic runs in the graph)."""
    b, c, h, w = x.shape
    x = ops.stack([x, x], axis=-1).reshape(b, c, h, w * 2)
    return ops.stack([x, x], axis=3).reshape(b, c, h * 2, w * 2)


def causal_mask(length):
    """Additive mask (1, 1, L, L) that hides future tokens, as CLIP's text encoder uses."""
    mask = np.triu(np.full((length, length), -np.inf, dtype=np.float32), k=1)
    return Tensor(mask[None, None])


def _split_heads(x, heads):
    b, n, c = x.shape
    return x.reshape(b, n, heads, c // heads).transpose(0, 2, 1, 3)


def math_attention(q, k, v, heads, mask=None):
    """Scaled dot-product attention on (B, L, C) tensors; softmax in float32."""
    b, n, c = q.shape
    scale = (c // heads) ** -0.5
    q, k, v = _split_heads(q, heads), _split_heads(k, heads), _split_heads(v, heads)
    scores = ops.matmul(q, k.transpose(0, 1, 3, 2)).astype(ms.float32) * scale
    if mask is not None:
        scores = scores + mask
    probs = ops.softmax(scores, axis=-1).astype(v.dtype)
    out = ops.matmul(probs, v)
    return out.transpose(0, 2, 1, 3).reshape(b, n, c)


class _HeadAttention(nn.Cell):
    """softmax(q k^T) v on (B*heads, L, D) tensors (q already scaled), with its backward written
    out (`bprop`), returning the probabilities too so the backward reuses them.

    Both directions are batched matmuls with transpose flags (no transposed copy of k, of the
    L x L probabilities or of their gradient), and the softmax backward's row sum is taken over
    the head dimension instead of the L x L matrix: sum_j P_ij dP_ij = dO_i . O_i (the identity
    flash attention's backward uses), subtracted inside the matmul that makes dP. What autodiff
    built from `matmul` + `softmax` instead: two L x L transposes per matmul gradient and a
    ReduceSum, a Sub and two Muls over L x L, the most expensive kernels of the CPU grad step
    (docs/training.md, "The grad step, per op").
    """

    def __init__(self):
        super().__init__()
        self.bmm = ops.BatchMatMul()
        self.bmm_nt = ops.BatchMatMul(transpose_b=True)
        self.bmm_tn = ops.BatchMatMul(transpose_a=True)
        self.softmax = ops.Softmax(-1)

    def construct(self, q, k, v):
        scores = self.bmm_nt(q, k)
        if scores.dtype != ms.float32:
            probs = self.softmax(scores.astype(ms.float32)).astype(v.dtype)
        else:
            probs = self.softmax(scores)
        return self.bmm(probs, v), probs

    def bprop(self, q, k, v, out, dout):
        o, probs = out
        do = dout[0]
        # dP - delta in one batched matmul: [dO, -delta] @ [V, 1]^T (one more column each),
        # instead of dO @ V^T followed by a broadcast subtraction over L x L
        delta = (do * o).sum(-1, keepdims=True)
        ones = ops.ones_like(v[..., :1])
        dprobs = self.bmm_nt(ops.cat([do, -delta], -1), ops.cat([v, ones], -1))
        dscores = probs * dprobs
        return self.bmm(dscores, k), self.bmm_tn(dscores, q), self.bmm_tn(probs, do)


class Attention(nn.Cell):
    """Unmasked multi-head attention on (B, L, C) tensors, or on token rows (B*L, C) of `batch`
    samples (the output has the input's layout): Ascend's fused flash-attention kernel there
    (float16/bfloat16 inputs), math attention elsewhere (`_HeadAttention`).

    The backend is fixed when the cell is built, so a compiled graph holds one path only and the
    device is never queried inside a graph.
    """

    def __init__(self, heads):
        super().__init__()
        self.heads = heads
        self.use_flash = device.is_ascend()
        self.head_attention = _HeadAttention()

    def construct(self, q, k, v, batch=None):
        rows = q.ndim == 2
        b = batch if rows else q.shape[0]
        c = q.shape[-1]
        heads, d = self.heads, c // self.heads
        if self.use_flash and q.dtype != ms.float32:
            out = ops.flash_attention_score(q.reshape(b, -1, c), k.reshape(b, -1, c),
                                            v.reshape(b, -1, c), heads, input_layout="BSH",
                                            scale_value=d ** -0.5)
            return out.reshape(-1, c) if rows else out
        # the scale on q (L x C values), not on the L x L scores
        q = _heads_first(q * (d ** -0.5), b, heads, d)
        out = self.head_attention(q, _heads_first(k, b, heads, d), _heads_first(v, b, heads, d))[0]
        out = out.reshape(b, heads, -1, d).transpose(0, 2, 1, 3)
        return out.reshape(-1, c) if rows else out.reshape(b, -1, c)


def _heads_first(x, b, heads, d):
    """(B, L, heads*D) or (B*L, heads*D) -> (B*heads, L, D)."""
    return x.reshape(b, -1, heads, d).transpose(0, 2, 1, 3).reshape(b * heads, -1, d)


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of a (B,) tensor, cos first (SGM's `timestep_embedding`)."""
    half = dim // 2
    freqs = Tensor(np.exp(-math.log(max_period) * np.arange(half, dtype=np.float32) / half))
    args = t.astype(ms.float32)[:, None] * freqs[None]
    return ops.cat([ops.cos(args), ops.sin(args)], axis=-1)


def enable_recompute(cells):
    """Gradient checkpointing: recompute each cell's activations in the backward pass.

    MindSpore lets a cell's recompute setting be made once, so this is a one-way switch, made per
    model before its first compiled step.
    """
    for cell in cells:
        cell.recompute()


def check_parameter_names_once(root):
    """MindSpore checks each cell's parameter names for duplicates on the cell's first PyNative
    call: every cell walks its whole subtree, and reading a name waits on the dispatch pipeline.
    Over a UNet and its LoRA that is about 45,000 waits, half of a first PyNative tiny-model
    generation (7.7 -> 3.6 s). Check the whole model once here, then mark its cells as checked
    (MindSpore's private `_is_check_and_refresh` flag; tests/test_model_structure.py pins it).
    The flag also skips the first call's lazy `init_data`, so a model with a parameter still
    waiting for its data (built under `no_init_parameters`, not loaded yet) is left unmarked.
    build_sdxl and the checkpoint loader mark their models; networks.lora marks a model again
    after inserting its branches."""
    params = list(root.get_parameters())
    if any(p.has_init for p in params):
        return
    names = [p.name for p in params]
    if len(set(names)) < len(names):
        seen = set()
        twice = sorted({n for n in names if n in seen or seen.add(n)})
        raise ValueError(f"{type(root).__name__} has duplicate parameter names: {twice[:5]}")
    for _, cell in root.cells_and_names():
        cell._is_check_and_refresh = True
