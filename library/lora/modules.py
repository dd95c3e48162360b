"""The LoRA cells: one branch (`LoRAModule`) and the hosts that replace a targeted `nn.Dense` /
`nn.Conv2d` in place, keeping its Parameters under their names and adding its branches' outputs
(library/lora/__init__.py says why they replace instead of patching a forward).
"""

import math

import numpy as np
import mindspore as ms
from mindspore import nn, ops, Tensor
from mindspore.common.initializer import HeUniform, initializer

from library import layers
from library.models.unet import SpatialTransformer


class LoRAModule(nn.Cell):
    """One LoRA branch: `delta(x) = lora_up(lora_down(x)) * multiplier * alpha / rank`.

    kohya's LoRAModule without the original forward (the host cell adds the base output).
    Dropouts act only in training mode, as kohya's: neuron dropout on the rank activations,
    rank dropout (a per-sample mask over the rank, rescaled by 1/(1-p)), module dropout (the
    whole branch skipped for a call with probability p).
    """

    def __init__(self, lora_name, org, lora_dim, alpha, multiplier, dropout=None,
                 rank_dropout=None, module_dropout=None, dtype=ms.float32):
        super().__init__()
        self.lora_name = lora_name
        self.lora_dim = int(lora_dim)
        self.is_conv = is_conv(org)
        if isinstance(alpha, (np.ndarray, Tensor)):
            alpha = float(np.asarray(alpha.asnumpy() if isinstance(alpha, Tensor) else alpha))
        alpha = self.lora_dim if alpha is None or alpha == 0 else float(alpha)
        self.alpha = float(alpha)
        self.scale = self.alpha / self.lora_dim
        if self.is_conv:
            in_dim, out_dim = org.in_channels, org.out_channels
            self.lora_down = nn.Conv2d(in_dim, self.lora_dim, org.kernel_size, stride=org.stride,
                                       pad_mode=org.pad_mode, padding=org.padding,
                                       has_bias=False, weight_init="zeros", dtype=dtype)
            self.lora_up = nn.Conv2d(self.lora_dim, out_dim, 1, has_bias=False,
                                     weight_init="zeros", dtype=dtype)
            fan_in = in_dim * org.kernel_size[0] * org.kernel_size[1]
        else:
            in_dim, out_dim = org.in_channels, org.out_channels
            self.lora_down = layers.Linear(in_dim, self.lora_dim, bias=False, weight_init="zeros",
                                           dtype=dtype)
            self.lora_up = layers.Linear(self.lora_dim, out_dim, bias=False, weight_init="zeros",
                                         dtype=dtype)
            fan_in = in_dim
        self.in_dim, self.out_dim, self.fan_in = in_dim, out_dim, fan_in
        # kohya (= Microsoft's LoRA): kaiming_uniform_(down, a=sqrt(5)), zeros_(up).
        self.lora_down.weight.set_data(
            initializer(HeUniform(math.sqrt(5)), self.lora_down.weight.shape, dtype))
        self.multiplier = multiplier
        self.dropout = None if dropout is None else float(dropout)
        self.rank_dropout = None if rank_dropout is None else float(rank_dropout)
        self.module_dropout = None if module_dropout is None else float(module_dropout)

    def construct(self, x):
        dtype = self.lora_down.weight.dtype
        lx = self.lora_down(x.astype(dtype))
        scale = self.scale
        if self.training and self.dropout is not None:
            lx = ops.dropout(lx, p=self.dropout, training=True)
        if self.training and self.rank_dropout is not None:
            keep = (ops.rand((lx.shape[0], self.lora_dim)) > self.rank_dropout).astype(dtype)
            if lx.ndim == 3:
                keep = keep[:, None, :]
            elif lx.ndim == 4:
                keep = keep[:, :, None, None]
            lx = lx * keep
            scale = scale / (1.0 - self.rank_dropout)
        # the scale on the rank-r activations, not on the (tokens x out) output: a far
        # smaller multiply forward and backward
        out = self.lora_up(lx * (self.multiplier.astype(dtype) * scale))
        if self.training and self.module_dropout is not None:
            out = out * (ops.rand((1,)) >= self.module_dropout).astype(dtype)
        return out

    # -- numpy views (float32) --
    def down_up(self):
        return (self.lora_down.weight.astype(ms.float32).asnumpy(),
                self.lora_up.weight.astype(ms.float32).asnumpy())

    def delta_weight(self, down=None, up=None):
        """ΔW = (alpha/rank)·up@down in the original weight's layout (float32, no multiplier)."""
        if down is None:
            down, up = self.down_up()
        return delta_weight(down, up, self.scale)


class LoRADense(nn.Cell):
    """Drop-in replacement for a targeted `nn.Dense`: the same `weight`/`bias` Parameters and
    forward, plus the sum of its LoRA branches."""

    def __init__(self, org):
        super().__init__()
        self.in_channels, self.out_channels = org.in_channels, org.out_channels
        self.has_bias = org.has_bias
        self.weight = org.weight
        self.bias = org.bias if self.has_bias else None
        self.lora_branches = nn.CellList()

    def construct(self, x):
        return with_branches(layers.linear(x, self.weight, self.bias), x, self.lora_branches)


class LoRAConv2d(nn.Cell):
    """Drop-in replacement for a targeted `nn.Conv2d` (same primitive, weight and bias)."""

    def __init__(self, org):
        super().__init__()
        self.in_channels, self.out_channels = org.in_channels, org.out_channels
        self.kernel_size, self.stride = org.kernel_size, org.stride
        self.pad_mode, self.padding = org.pad_mode, org.padding
        self.has_bias = org.has_bias
        self.weight = org.weight
        if self.has_bias:
            self.bias = org.bias
        self.conv2d = org.conv2d
        self.bias_add = ops.BiasAdd()
        self.lora_branches = nn.CellList()

    def construct(self, x):
        y = self.conv2d(x, self.weight)
        if self.has_bias:
            y = self.bias_add(y, self.bias)
        return with_branches(y, x, self.lora_branches)


def with_branches(y, x, branches):
    """The host's output plus each LoRA branch's, as one same-shape sum (`layers.add`)."""
    outs = [y]
    for branch in branches:
        outs.append(branch(x).astype(y.dtype))
    return layers.add(*outs)


def keep_sample_axis(unets):
    """Rank dropout masks per sample over (B, L, r) activations (kohya): the UNets' transformers
    then keep (B, L, C) tokens instead of token rows (SpatialTransformer)."""
    for unet in unets:
        for _, cell in unet.cells_and_names():
            if isinstance(cell, SpatialTransformer):
                cell.token_rows = False


HOSTS = (LoRADense, LoRAConv2d)


def is_conv(cell):
    return isinstance(cell, (nn.Conv2d, LoRAConv2d))


def is_linear(cell):
    return isinstance(cell, (nn.Dense, LoRADense))


def delta_weight(down, up, scale):
    """(alpha/rank)·up@down reshaped to the original weight: Linear [out,in]; conv [out,in,k,k]
    (the 1×1 up kernel folds into the down kernel, exact for any kernel size)."""
    down = np.asarray(down, dtype=np.float32)
    up = np.asarray(up, dtype=np.float32)
    out_dim, rank = up.shape[0], up.shape[1]
    flat = up.reshape(out_dim, rank) @ down.reshape(rank, -1)
    return (flat * np.float32(scale)).reshape((out_dim,) + down.shape[1:])
