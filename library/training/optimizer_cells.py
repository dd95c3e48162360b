"""Optimizers as MindSpore Cells that run inside the compiled train step.

Each one reproduces the update of the PyTorch implementation kohya uses (torch.optim.AdamW,
torch.optim.SGD with nesterov=True, lion_pytorch.Lion, transformers' Adafactor, prodigyopt's
Prodigy). Common contract:

    optimizer = AdamW(groups, weight_decay=0.01)     # groups: [ParamGroup(params, lr, description)]
    done = optimizer(grads, lrs)                      # inside the step; then ops.depend(loss, done)

The optimizer works on flat vectors (library.training.flat): `optimizer.layout` is the
FlatLayout of its groups, `grads` holds one float32 gradient vector per segment
(`layout.flatten(per_parameter_grads)`, or the grad step's flat buffers), and the state (moments,
step count) is one flat Parameter per segment named `<state>.<segment name>`, saved and restored
with the training state. So an update is a few kernels per parameter group whatever the number
of LoRA tensors; only writing the new values back into the parameters is per tensor. `lrs` is a
float32 tensor (num_groups,) with each group's current LR, computed on the host by
library/training/schedules.py, so a new LR never recompiles the step. Updates are computed in
float32 and written back in the parameters' dtype.

One file for the five (about 430 lines): they share GroupedOptimizer, its flat state and its
write-back, and each adds only its update rule.
"""

import math
from typing import NamedTuple, Sequence

import numpy as np
import mindspore as ms
from mindspore import nn, ops, Parameter, ParameterTuple, Tensor

from library.lora.network import ParamGroup
from library.training.flat import FlatLayout

F32 = ms.float32


def _f32(value):
    return Tensor(value, F32)


class GroupedOptimizer(nn.Cell):
    """The flat layout of the groups, each segment's group index and the step counter."""

    def __init__(self, groups: Sequence[ParamGroup]):
        super().__init__(auto_prefix=False)
        self.groups = list(groups)
        self.layout = FlatLayout(self.groups)
        self.params = self.layout.params
        self.segment_groups = tuple(s.group for s in self.layout.segments)
        self.step_count = Parameter(Tensor(0, ms.int32), name="optimizer.step", requires_grad=False)
        # Parameters that are working memory, not state: a training state leaves them out
        self.scratch_names = set()

    @property
    def base_lrs(self):
        return [g.lr for g in self.groups]

    def state(self, prefix, used=True, sizes=None):
        """Zero float32 state, one flat Parameter per segment named `<prefix>.<segment name>`, of
        `sizes[k]` values (default: the segment's); a 1-value placeholder where `used` (a bool,
        or one per segment) is False, so the state's names do not depend on the options."""
        segments = self.layout.segments
        used = used if isinstance(used, tuple) else (used,) * len(segments)
        sizes = sizes or tuple(s.size for s in segments)
        return ParameterTuple(Parameter(Tensor(np.zeros(n if u else 1, np.float32)),
                                        name=f"{prefix}.{s.name}", requires_grad=False)
                              for s, u, n in zip(segments, used, sizes))

    def lr(self, lrs, k):
        """Segment k's group LR, a float32 scalar."""
        return lrs.astype(F32)[self.segment_groups[k]]

    def next_step(self):
        """Increment the step counter; returns the new count as float32."""
        step = self.step_count + 1
        self.step_count.copy_(step)
        return step.astype(F32)


# ----------------------------------------------------------------------------------------- AdamW

class AdamW(GroupedOptimizer):
    """torch.optim.AdamW (decoupled weight decay, bias correction); torch's defaults.

    With 0 < betas < 1, eps > 0 and weight_decay >= 0 (what MindSpore's kernel accepts) each
    segment is one call of the fused ops.AdamWeightDecay kernel, one pass over the vectors
    instead of about 15 elementwise kernels, each a pass over a whole group's values (on the
    2,104 tensors of a full-size SDXL LoRA, 31.8 M values, that is most of the apply step). The
    kernel has no bias correction; torch's update is reproduced by rescaling its inputs:
    lr' = lr·sqrt(bc2)/bc1, eps' = eps·sqrt(bc2), decay' = weight_decay·bc1/sqrt(bc2), which
    changes only the rounding (tests/test_train_optim.py). The kernel updates its `var` in
    place and needs a Parameter there, so the parameters' values are copied into `staging` (not
    saved with the state: it holds the parameters). Other settings use the elementwise formula.
    """

    def __init__(self, groups, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(groups)
        self.beta1, self.beta2 = _f32(betas[0]), _f32(betas[1])
        self.eps, self.weight_decay = _f32(eps), _f32(weight_decay)
        self.exp_avg = self.state("exp_avg")
        self.exp_avg_sq = self.state("exp_avg_sq")
        self.fused = 0 < betas[0] < 1 and 0 < betas[1] < 1 and eps > 0 and weight_decay >= 0
        if self.fused:
            self.staging = self.state("adamw_staging")
            self.scratch_names = {p.name for p in self.staging}
            self.adam_weight_decay = ops.AdamWeightDecay()

    def construct(self, grads, lrs):
        t = self.next_step()
        bias_correction1 = 1 - ops.pow(self.beta1, t)
        bias_correction2_sqrt = ops.sqrt(1 - ops.pow(self.beta2, t))
        params = self.layout.read()
        new = ()
        for k in range(len(self.segment_groups)):
            lr = self.lr(lrs, k)
            if self.fused:
                new = new + (self._fused(k, params[k], grads[k], lr, bias_correction1,
                                         bias_correction2_sqrt),)
                continue
            g = grads[k]
            p = params[k] * (1 - lr * self.weight_decay)
            m = self.exp_avg[k] + (g - self.exp_avg[k]) * (1 - self.beta1)  # torch: lerp_
            v = self.exp_avg_sq[k] * self.beta2 + g * g * (1 - self.beta2)
            denom = ops.sqrt(v) / bias_correction2_sqrt + self.eps
            new = new + (p - (lr / bias_correction1) * m / denom,)
            self.exp_avg[k].copy_(m)
            self.exp_avg_sq[k].copy_(v)
        return self.layout.write(new)

    def _fused(self, k, p, g, lr, bias_correction1, bias_correction2_sqrt):
        var = self.staging[k]
        var.copy_(p)
        done = self.adam_weight_decay(
            var, self.exp_avg[k], self.exp_avg_sq[k], lr * bias_correction2_sqrt / bias_correction1,
            self.beta1, self.beta2, self.eps * bias_correction2_sqrt,
            self.weight_decay * bias_correction1 / bias_correction2_sqrt, g)
        return ops.depend(var * 1, done)


# ------------------------------------------------------------------------------------------ Lion

class Lion(GroupedOptimizer):
    """lion_pytorch.Lion. With decoupled_weight_decay the decay is divided by the optimizer's
    initial LR (`learning_rate`, kohya's --learning_rate), as lion-pytorch does."""

    def __init__(self, groups, learning_rate, betas=(0.9, 0.99), weight_decay=0.0,
                 decoupled_weight_decay=False):
        super().__init__(groups)
        self.beta1, self.beta2 = _f32(betas[0]), _f32(betas[1])
        self.weight_decay = _f32(weight_decay / learning_rate if decoupled_weight_decay else weight_decay)
        self.exp_avg = self.state("exp_avg")

    def construct(self, grads, lrs):
        self.next_step()
        params = self.layout.read()
        new = ()
        for k in range(len(self.segment_groups)):
            lr = self.lr(lrs, k)
            g, m = grads[k], self.exp_avg[k]
            p = params[k] * (1 - lr * self.weight_decay)
            new = new + (p - lr * ops.sign(m * self.beta1 + g * (1 - self.beta1)),)
            m.copy_(m * self.beta2 + g * (1 - self.beta2))
        return self.layout.write(new)


# ----------------------------------------------------------------------------------- SGDNesterov

class SGDNesterov(GroupedOptimizer):
    """torch.optim.SGD(nesterov=True, dampening=0); kohya sets momentum 0.9 when not given."""

    def __init__(self, groups, momentum=0.9, weight_decay=0.0):
        super().__init__(groups)
        if momentum <= 0:
            raise ValueError("Nesterov momentum needs momentum > 0")
        self.momentum, self.weight_decay = _f32(momentum), _f32(weight_decay)
        self.momentum_buffer = self.state("momentum_buffer")

    def construct(self, grads, lrs):
        self.next_step()
        params = self.layout.read()
        new = ()
        for k in range(len(self.segment_groups)):
            p = params[k]
            g = grads[k] + self.weight_decay * p
            # torch starts the buffer at the first gradient; with dampening 0 that equals 0·m + g
            b = self.momentum_buffer[k] * self.momentum + g
            self.momentum_buffer[k].copy_(b)
            new = new + (p - self.lr(lrs, k) * (g + self.momentum * b),)
        return self.layout.write(new)


# ------------------------------------------------------------------------------------- Adafactor

class _FactoredIndex(NamedTuple):
    """Per segment, which row / column / tensor each value belongs to, so that the per-matrix
    reductions of Adafactor are one unsorted_segment_sum each over the whole segment."""
    tensor_ids: Tensor      # (size,) int32: the tensor of each value
    tensor_counts: Tensor   # (tensors,) float32: values per tensor
    factored: Tensor        # (size,) bool: the value belongs to a tensor of rank >= 2
    row_ids: Tensor         # (size,) int32: its row (shape[:-1] index); 0 when not factored
    col_ids: Tensor         # (size,) int32: its column (shape[:-2] + shape[-1:] index); 0 ditto
    row_div: Tensor         # (rows,) float32: the length of each row (shape[-1])
    col_div: Tensor         # (cols,) float32: the length of each column (shape[-2])
    row_group_ids: Tensor   # (rows,) int32: rows averaged together (the last row axis, shape[-2])
    row_group_div: Tensor   # (row groups,) float32: rows per row group
    sizes: tuple            # python ints: tensors, rows, cols, row groups


def _factored_index(shapes):
    tensor_ids, factored, row_ids, col_ids = [], [], [], []
    row_div, col_div, row_group_ids, row_group_div = [], [], [], []
    for t, shape in enumerate(shapes):
        n = int(np.prod(shape))
        local = np.arange(n)
        tensor_ids.append(np.full(n, t))
        if len(shape) < 2:
            factored.append(np.zeros(n, bool))
            row_ids.append(np.zeros(n, np.int64))
            col_ids.append(np.zeros(n, np.int64))
            continue
        a, b = shape[-2], shape[-1]
        rows, cols = n // b, n // a
        factored.append(np.ones(n, bool))
        row_ids.append(len(row_div) + local // b)
        col_ids.append(len(col_div) + (local // (a * b)) * b + local % b)
        row_group_ids.append(len(row_group_div) + np.arange(rows) // a)
        row_div.extend([b] * rows)
        col_div.extend([a] * cols)
        row_group_div.extend([a] * (rows // a))
    counts = [int(np.prod(s)) for s in shapes]

    def ints(parts):
        return Tensor(np.concatenate(parts).astype(np.int32) if parts else np.zeros(1, np.int32))

    def floats(values):
        return Tensor(np.asarray(values or [1], np.float32))

    return _FactoredIndex(ints(tensor_ids), floats(counts), Tensor(np.concatenate(factored)),
                          ints(row_ids), ints(col_ids), floats(row_div), floats(col_div),
                          ints(row_group_ids), floats(row_group_div),
                          (len(shapes), len(row_div), len(col_div), len(row_group_div)))


def _per_tensor_rms(x, index):
    """RMS of each tensor's values in a flat segment, gathered back to the values."""
    mean_sq = ops.unsorted_segment_sum(x * x, index.tensor_ids, index.sizes[0]) / index.tensor_counts
    return ops.gather(ops.sqrt(mean_sq), index.tensor_ids, 0)


class Adafactor(GroupedOptimizer):
    """transformers.optimization.Adafactor.

    relative_step=True (default): the step size is min(1e-2, 1/sqrt(step)) (warmup_init:
    min(1e-6·step, 1/sqrt(step))) and the `lrs` input is ignored; relative_step=False: the group's
    LR. scale_parameter multiplies the step size by max(eps[1], RMS(param)). Parameters of rank
    >= 2 keep factored second moments (row and column means), others a full one.

    Its per-matrix quantities (row and column means, each tensor's RMS and update clipping) are
    unsorted_segment_sum reductions over the flat segment with constant index vectors
    (_FactoredIndex), so the update is a fixed number of kernels per segment; the row and column
    moments of all matrices of a segment sit in one vector each (`exp_avg_sq_row` /
    `exp_avg_sq_col`). `exp_avg_sq` holds the full moments of the rank-1 tensors at their
    positions (zero elsewhere), a placeholder in a segment without any; `exp_avg` is a placeholder
    without beta1.
    """

    def __init__(self, groups, eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8, beta1=None,
                 weight_decay=0.0, scale_parameter=True, relative_step=True, warmup_init=False):
        super().__init__(groups)
        if warmup_init and not relative_step:
            raise ValueError("Adafactor's warmup_init needs relative_step")
        self.eps1, self.eps2 = _f32(eps[0]), _f32(eps[1])
        self.decay_rate = _f32(decay_rate)
        self.clip_threshold, self.beta1 = _f32(clip_threshold), _f32(beta1 or 0.0)
        self.weight_decay = _f32(weight_decay)
        self.relative_step, self.warmup_init = relative_step, warmup_init
        self.scale_parameter = scale_parameter
        self.use_first_moment = beta1 is not None
        layout = self.layout
        self.index = tuple(_factored_index(layout.shapes[s.start:s.stop]) for s in layout.segments)
        # static per segment: which of the two kinds of second moment it needs
        self.has_factored = tuple(i.sizes[1] > 0 for i in self.index)
        self.has_full = tuple(any(len(sh) < 2 for sh in layout.shapes[s.start:s.stop])
                              for s in layout.segments)
        self.exp_avg = self.state("exp_avg", self.use_first_moment)
        self.exp_avg_sq_row = self.state("exp_avg_sq_row", self.has_factored,
                                         tuple(i.sizes[1] for i in self.index))
        self.exp_avg_sq_col = self.state("exp_avg_sq_col", self.has_factored,
                                         tuple(i.sizes[2] for i in self.index))
        self.exp_avg_sq = self.state("exp_avg_sq", self.has_full)

    def construct(self, grads, lrs):
        t = self.next_step()
        min_step = t * 1e-6 if self.warmup_init else ops.ones_like(t) * 1e-2
        relative_step_size = ops.minimum(min_step, ops.rsqrt(t))
        beta2t = 1 - ops.pow(t, self.decay_rate)
        params = self.layout.read()
        new = ()
        for k in range(len(self.segment_groups)):
            new = new + (self._update(k, params[k], grads[k], lrs, relative_step_size, beta2t),)
        return self.layout.write(new)

    def _update(self, k, p, g, lrs, relative_step_size, beta2t):
        index = self.index[k]
        lr = relative_step_size if self.relative_step else self.lr(lrs, k)
        if self.scale_parameter:
            lr = lr * ops.maximum(self.eps2, _per_tensor_rms(p, index))
        sq = g * g + self.eps1
        if not self.has_full[k]:
            update = self._factored(k, index, sq, g, beta2t)
        elif not self.has_factored[k]:
            update = self._full(k, sq, g, beta2t)
        else:
            factored = index.factored
            update = ops.select(factored, self._factored(k, index, sq, g, beta2t),
                                self._full(k, sq, g, beta2t, factored))
        update = update / ops.maximum(_per_tensor_rms(update, index) / self.clip_threshold, 1.0) * lr
        if self.use_first_moment:
            update = self.exp_avg[k] * self.beta1 + update * (1 - self.beta1)
            self.exp_avg[k].copy_(update)
        return p - p * (self.weight_decay * lr) - update

    def _factored(self, k, index, sq, g, beta2t):
        """The update of the rank >= 2 tensors: row and column moments (zero at the others)."""
        _, rows, cols, row_groups = index.sizes
        sq = ops.select(index.factored, sq, ops.zeros_like(sq))
        row_mean = ops.unsorted_segment_sum(sq, index.row_ids, rows) / index.row_div
        col_mean = ops.unsorted_segment_sum(sq, index.col_ids, cols) / index.col_div
        r = self.exp_avg_sq_row[k] * beta2t + row_mean * (1 - beta2t)
        c = self.exp_avg_sq_col[k] * beta2t + col_mean * (1 - beta2t)
        self.exp_avg_sq_row[k].copy_(r)
        self.exp_avg_sq_col[k].copy_(c)
        r_mean = ops.unsorted_segment_sum(r, index.row_group_ids, row_groups) / index.row_group_div
        r_factor = ops.rsqrt(r / ops.gather(r_mean, index.row_group_ids, 0))
        return ops.gather(r_factor, index.row_ids, 0) * ops.gather(ops.rsqrt(c), index.col_ids, 0) * g

    def _full(self, k, sq, g, beta2t, factored=None):
        """The update of the rank-1 tensors: a full second moment (kept at zero where
        `factored`, so the saved state holds only what it means)."""
        v = self.exp_avg_sq[k] * beta2t + sq * (1 - beta2t)
        if factored is not None:
            v = ops.select(factored, ops.zeros_like(v), v)
        self.exp_avg_sq[k].copy_(v)
        return ops.rsqrt(v) * g


# --------------------------------------------------------------------------------------- Prodigy

class Prodigy(GroupedOptimizer):
    """prodigyopt.Prodigy (slice_p=1, no FSDP): Adam whose step size d·lr is estimated online.

    All groups must share one LR (or use 0), as prodigyopt requires; `p0` is the parameters'
    value when the optimizer is built, so build it after the weights are loaded.
    """

    def __init__(self, groups, betas=(0.9, 0.999), beta3=None, eps=1e-8, weight_decay=0.0,
                 decouple=True, use_bias_correction=False, safeguard_warmup=False, d0=1e-6,
                 d_coef=1.0, growth_rate=float("inf")):
        super().__init__(groups)
        lrs = {g.lr for g in self.groups} - {0.0}
        if len(lrs) > 1:
            raise ValueError("Prodigy needs the same LR for every parameter group (or 0); got "
                             + ", ".join(f"{g.description}={g.lr}" for g in self.groups))
        beta1, beta2 = betas
        beta3 = math.sqrt(beta2) if beta3 is None else beta3
        self.beta1, self.beta2, self.beta3 = _f32(beta1), _f32(beta2), _f32(beta3)
        self.use_bias_correction, self.safeguard_warmup = use_bias_correction, safeguard_warmup
        self.d0, self.d_coef, self.growth_rate = _f32(d0), _f32(d_coef), _f32(growth_rate)
        self.has_first_moment = beta1 > 0
        self.eps = _f32(eps)
        self.coupled_decay = _f32(0.0 if decouple else weight_decay)
        self.decoupled_decay = _f32(weight_decay if decouple else 0.0)
        self.d = Parameter(_f32(d0), name="prodigy.d", requires_grad=False)
        self.d_max = Parameter(_f32(d0), name="prodigy.d_max", requires_grad=False)
        self.d_numerator = Parameter(_f32(0.0), name="prodigy.d_numerator", requires_grad=False)
        self.p0 = self.layout.initial("p0")
        self.exp_avg = self.state("exp_avg", self.has_first_moment)
        self.exp_avg_sq = self.state("exp_avg_sq")
        self.s = self.state("s")

    def construct(self, grads, lrs):
        lr = lrs.astype(F32).max()
        d, d_max = self.d * 1, self.d_max * 1
        # prodigyopt's k counts completed steps; our counter is incremented only when we step
        k = self.step_count.astype(F32)
        bias_correction = ops.ones_like(lr)
        if self.use_bias_correction:
            bias_correction = ops.sqrt(1 - ops.pow(self.beta2, k + 1)) / (1 - ops.pow(self.beta1, k + 1))
        dlr = d * lr * bias_correction
        s_scale = d if self.safeguard_warmup else dlr
        d_ratio = d / self.d0
        params = self.layout.read()
        zero = ops.zeros((), F32)
        numerator, d_denom = zero, zero
        first, second, decayed = (), (), ()
        # first pass: moments and s of every segment, and the sums that give d
        for i in range(len(self.segment_groups)):
            p = params[i]
            g = grads[i] + self.coupled_decay * p  # weight_decay > 0 with decouple=False
            active = self.lr(lrs, i) > 0  # prodigyopt skips groups whose LR is 0
            on = ops.broadcast_to(active, p.shape)
            numerator = numerator + ops.select(active, (g * (self.p0[i] - p)).sum(), zero)
            m = self.exp_avg[i]
            if self.has_first_moment:
                m = ops.select(on, m * self.beta1 + g * (d * (1 - self.beta1)), m)
                self.exp_avg[i].copy_(m)
            v = ops.select(on, self.exp_avg_sq[i] * self.beta2 + g * g * (d * d * (1 - self.beta2)),
                           self.exp_avg_sq[i])
            self.exp_avg_sq[i].copy_(v)
            s_new = ops.select(on, self.s[i] * self.beta3 + g * (d_ratio * s_scale), self.s[i])
            self.s[i].copy_(s_new)
            d_denom = d_denom + ops.select(active, ops.abs(s_new).sum(), zero)
            first, second, decayed = first + (m,), second + (v,), decayed + (g,)
        delta_numerator = numerator * d_ratio * dlr
        # prodigyopt returns before touching d or the parameters when sum|s| is 0
        proceed = d_denom > 0
        global_numerator = self.d_numerator * self.beta3 + delta_numerator
        d_hat = self.d_coef * global_numerator / ops.select(proceed, d_denom, ops.ones_like(d_denom))
        d_new = ops.select(ops.logical_and(proceed, d == self.d0), ops.maximum(d, d_hat), d)
        d_max_new = ops.maximum(d_max, d_hat)
        d_new = ops.minimum(d_max_new, d_new * self.growth_rate)
        self.d.copy_(ops.select(proceed, d_new, d))
        self.d_max.copy_(ops.select(proceed, d_max_new, d_max))
        self.d_numerator.copy_(ops.select(proceed, global_numerator, self.d_numerator))
        self.step_count.copy_(self.step_count + proceed.astype(ms.int32))
        # second pass: the parameter update (all of it skipped when `proceed` is False)
        new = ()
        for i in range(len(self.segment_groups)):
            p = params[i]
            denom = ops.sqrt(second[i]) + d_new * self.eps
            value = p - p * (self.decoupled_decay * dlr)
            if self.has_first_moment:
                value = value - dlr * first[i] / denom
            else:
                value = value - dlr * d_new * decayed[i] / denom
            new = new + (ops.select(ops.broadcast_to(proceed, p.shape), value, p),)
        return self.layout.write(new)
