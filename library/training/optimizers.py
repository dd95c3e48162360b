"""Optimizers as MindSpore Cells that run inside the compiled train step.

Each one reproduces the update of the PyTorch implementation kohya uses (torch.optim.AdamW,
torch.optim.SGD with nesterov=True, lion_pytorch.Lion, transformers' Adafactor, prodigyopt's
Prodigy). Common contract:

    optimizer = AdamW(groups, weight_decay=0.01)     # groups: [ParamGroup(params, lr, description)]
    done = optimizer(grads, lrs)                      # inside the step; then ops.depend(loss, done)

`grads` is a tuple in the order of `optimizer.params` (the groups' params, concatenated); `lrs` is
a float32 tensor (num_groups,) with each group's current LR, computed on the host by
library/training/schedules.py, so a new LR never recompiles the step. State (moments, step
count) lives in Parameters named `<state>.<param name>`, so it can be saved and restored with the
network. Updates are computed in float32 and written back in the parameter's dtype.

Per-parameter updates go through `ops.HyperMap` over a `MultitypeFuncGraph`, the formulation of
MindSpore's own nn.AdamWeightDecay, which compiles several times faster than a Python loop.
"""

import math
from typing import NamedTuple, Sequence

import numpy as np
import mindspore as ms
from mindspore import nn, ops, Parameter, ParameterTuple, Tensor

F32 = ms.float32


class ParamGroup(NamedTuple):
    params: Sequence[Parameter]
    lr: float
    description: str


def _f32(value):
    return Tensor(value, F32)


class GroupedOptimizer(nn.Cell):
    """Parameters, per-parameter group index and the step counter shared by all optimizers."""

    def __init__(self, groups: Sequence[ParamGroup]):
        super().__init__(auto_prefix=False)
        self.groups = list(groups)
        params = [p for g in self.groups for p in g.params]
        if not params:
            raise ValueError("the optimizer got no parameters")
        self.params = ParameterTuple(params)
        # one constant per parameter: HyperMap passes it to the update, which reads lrs[group]
        self.group_ids = tuple(Tensor(i, ms.int32) for i, g in enumerate(self.groups) for _ in g.params)
        self.step_count = Parameter(Tensor(0, ms.int32), name="optimizer.step", requires_grad=False)
        self.hyper_map = ops.HyperMap()

    @property
    def base_lrs(self):
        return [g.lr for g in self.groups]

    def state(self, prefix, params=None, shape=None):
        """Zero float32 state, one Parameter per parameter (`shape(param)` overrides the shape)."""
        params = self.params if params is None else params
        return ParameterTuple(
            Parameter(Tensor(np.zeros(shape(p) if shape else p.shape, dtype=np.float32)),
                      name=f"{prefix}.{p.name}", requires_grad=False)
            for p in params)

    def next_step(self):
        """Increment the step counter; returns the new count as float32."""
        step = self.step_count + 1
        ops.assign(self.step_count, step)
        return step.astype(F32)


def _write(param, value):
    return ops.assign(param, value.astype(param.dtype))


def _lr(lrs, group_id):
    return ops.gather(lrs.astype(F32), group_id, 0)


# ----------------------------------------------------------------------------------------- AdamW

_adamw = ops.MultitypeFuncGraph("adamw")


@_adamw.register("Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor",
                 "Tensor", "Tensor", "Tensor", "Tensor")
def _adamw_update(beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2_sqrt,
                  lrs, group_id, param, exp_avg, exp_avg_sq, grad):
    lr = _lr(lrs, group_id)
    g = grad.astype(F32)
    p = param.astype(F32) * (1 - lr * weight_decay)
    m = exp_avg + (g - exp_avg) * (1 - beta1)  # torch: exp_avg.lerp_(grad, 1 - beta1)
    v = exp_avg_sq * beta2 + g * g * (1 - beta2)
    denom = ops.sqrt(v) / bias_correction2_sqrt + eps
    p = p - (lr / bias_correction1) * m / denom
    ops.assign(exp_avg, m)
    ops.assign(exp_avg_sq, v)
    return _write(param, p)


class AdamW(GroupedOptimizer):
    """torch.optim.AdamW (decoupled weight decay, bias correction); torch's defaults."""

    def __init__(self, groups, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(groups)
        self.beta1, self.beta2 = _f32(betas[0]), _f32(betas[1])
        self.eps, self.weight_decay = _f32(eps), _f32(weight_decay)
        self.exp_avg = self.state("exp_avg")
        self.exp_avg_sq = self.state("exp_avg_sq")

    def construct(self, grads, lrs):
        t = self.next_step()
        bias_correction1 = 1 - ops.pow(self.beta1, t)
        bias_correction2_sqrt = ops.sqrt(1 - ops.pow(self.beta2, t))
        update = ops.partial(_adamw, self.beta1, self.beta2, self.eps, self.weight_decay,
                             bias_correction1, bias_correction2_sqrt, lrs)
        return self.hyper_map(update, self.group_ids, self.params, self.exp_avg, self.exp_avg_sq, grads)


# ------------------------------------------------------------------------------------------ Lion

_lion = ops.MultitypeFuncGraph("lion")


@_lion.register("Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor")
def _lion_update(beta1, beta2, weight_decay, lrs, group_id, param, exp_avg, grad):
    lr = _lr(lrs, group_id)
    g = grad.astype(F32)
    p = param.astype(F32) * (1 - lr * weight_decay)
    p = p - lr * ops.sign(exp_avg * beta1 + g * (1 - beta1))
    ops.assign(exp_avg, exp_avg * beta2 + g * (1 - beta2))
    return _write(param, p)


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
        update = ops.partial(_lion, self.beta1, self.beta2, self.weight_decay, lrs)
        return self.hyper_map(update, self.group_ids, self.params, self.exp_avg, grads)


# ----------------------------------------------------------------------------------- SGDNesterov

_sgd_nesterov = ops.MultitypeFuncGraph("sgd_nesterov")


@_sgd_nesterov.register("Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor")
def _sgd_nesterov_update(momentum, weight_decay, lrs, group_id, param, buf, grad):
    lr = _lr(lrs, group_id)
    p = param.astype(F32)
    g = grad.astype(F32) + weight_decay * p
    # torch starts the buffer at the first gradient; with dampening 0 that equals 0·m + g
    b = buf * momentum + g
    ops.assign(buf, b)
    return _write(param, p - lr * (g + momentum * b))


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
        update = ops.partial(_sgd_nesterov, self.momentum, self.weight_decay, lrs)
        return self.hyper_map(update, self.group_ids, self.params, self.momentum_buffer, grads)


# ------------------------------------------------------------------------------------- Adafactor

def _rms(x):
    return ops.sqrt((x * x).mean())


_adafactor = ops.MultitypeFuncGraph("adafactor")


@_adafactor.register("Tuple", "Tensor", "Tensor", "Tensor", "Tensor", "Bool", "Tensor", "Tensor",
                     "Tensor", "Tensor", "Tensor", "Tensor", "Tensor")
def _adafactor_update(cfg, eps1, beta2t, relative_step_size, lrs, factored, group_id, param,
                      exp_avg, row, col, exp_avg_sq, grad):
    clip_threshold, beta1, weight_decay, eps2, use_first_moment, relative_step, scale_parameter = cfg
    g = grad.astype(F32)
    p = param.astype(F32)
    lr = relative_step_size if relative_step else _lr(lrs, group_id)
    if scale_parameter:
        lr = lr * ops.maximum(eps2, _rms(p))
    sq = g * g + eps1
    if factored:  # rank >= 2: row and column means of the squared gradient
        r = row * beta2t + sq.mean(axis=-1) * (1 - beta2t)
        c = col * beta2t + sq.mean(axis=-2) * (1 - beta2t)
        ops.assign(row, r)
        ops.assign(col, c)
        r_factor = ops.rsqrt(r / r.mean(axis=-1, keep_dims=True)).expand_dims(-1)
        update = r_factor * ops.rsqrt(c).expand_dims(-2) * g
    else:
        v = exp_avg_sq * beta2t + sq * (1 - beta2t)
        ops.assign(exp_avg_sq, v)
        update = ops.rsqrt(v) * g
    update = update / ops.maximum(_rms(update) / clip_threshold, 1.0) * lr
    if use_first_moment:
        update = exp_avg * beta1 + update * (1 - beta1)
        ops.assign(exp_avg, update)
    return _write(param, p - p * (weight_decay * lr) - update)


def _placeholder(p):
    return (1,)


class Adafactor(GroupedOptimizer):
    """transformers.optimization.Adafactor.

    relative_step=True (default): the step size is min(1e-2, 1/sqrt(step)) (warmup_init:
    min(1e-6·step, 1/sqrt(step))) and the `lrs` input is ignored; relative_step=False: the group's
    LR. scale_parameter multiplies the step size by max(eps[1], RMS(param)). Parameters of rank
    >= 2 keep factored second moments (row and column means), others a full one; state a
    parameter does not use is a 1-element placeholder.
    """

    def __init__(self, groups, eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8, beta1=None,
                 weight_decay=0.0, scale_parameter=True, relative_step=True, warmup_init=False):
        super().__init__(groups)
        if warmup_init and not relative_step:
            raise ValueError("Adafactor's warmup_init needs relative_step")
        self.eps1 = _f32(eps[0])
        self.decay_rate = _f32(decay_rate)
        self.relative_step, self.warmup_init = relative_step, warmup_init
        use_first_moment = beta1 is not None
        self.cfg = (_f32(clip_threshold), _f32(beta1 or 0.0), _f32(weight_decay), _f32(eps[1]),
                    use_first_moment, relative_step, scale_parameter)
        self.factored = tuple(len(p.shape) >= 2 for p in self.params)

        def row_shape(p):
            return p.shape[:-1] if len(p.shape) >= 2 else (1,)

        def col_shape(p):
            return p.shape[:-2] + p.shape[-1:] if len(p.shape) >= 2 else (1,)

        def full_shape(p):
            return (1,) if len(p.shape) >= 2 else p.shape

        self.exp_avg = self.state("exp_avg", None, None if use_first_moment else _placeholder)
        self.exp_avg_sq_row = self.state("exp_avg_sq_row", None, row_shape)
        self.exp_avg_sq_col = self.state("exp_avg_sq_col", None, col_shape)
        self.exp_avg_sq = self.state("exp_avg_sq", None, full_shape)

    def construct(self, grads, lrs):
        t = self.next_step()
        min_step = t * 1e-6 if self.warmup_init else ops.ones_like(t) * 1e-2
        relative_step_size = ops.minimum(min_step, ops.rsqrt(t))
        beta2t = 1 - ops.pow(t, self.decay_rate)
        update = ops.partial(_adafactor, self.cfg, self.eps1, beta2t, relative_step_size, lrs)
        return self.hyper_map(update, self.factored, self.group_ids, self.params, self.exp_avg,
                              self.exp_avg_sq_row, self.exp_avg_sq_col, self.exp_avg_sq, grads)


# --------------------------------------------------------------------------------------- Prodigy

_prodigy_apply = ops.MultitypeFuncGraph("prodigy_apply")


def _prodigy_moments(cfg, d_ratio, d, s_scale, lrs, group_id, param, p0, exp_avg, exp_avg_sq, s,
                     grad):
    """First pass for one parameter: moments and s; returns [numerator term, sum|s|]."""
    beta1, beta2, beta3, coupled_decay, has_first_moment = cfg
    p = param.astype(F32)
    g = grad.astype(F32) + coupled_decay * p  # weight_decay > 0 with decouple=False
    active = _lr(lrs, group_id) > 0  # prodigyopt skips groups whose LR is 0
    on = ops.broadcast_to(active, p.shape)
    zero = ops.zeros((), F32)
    numerator = ops.select(active, (g * (p0 - p)).sum(), zero)
    if has_first_moment:
        ops.assign(exp_avg, ops.select(on, exp_avg * beta1 + g * (d * (1 - beta1)), exp_avg))
    ops.assign(exp_avg_sq, ops.select(on, exp_avg_sq * beta2 + g * g * (d * d * (1 - beta2)), exp_avg_sq))
    s_new = ops.select(on, s * beta3 + g * (d_ratio * s_scale), s)
    ops.assign(s, s_new)
    return ops.stack((numerator, ops.select(active, ops.abs(s_new).sum(), zero)))


@_prodigy_apply.register("Tuple", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor",
                         "Tensor")
def _prodigy_apply_update(cfg, proceed, dlr, d, param, exp_avg, exp_avg_sq, grad):
    """Second pass: the parameter update (skipped entirely when `proceed` is False)."""
    eps, coupled_decay, decoupled_decay, has_first_moment = cfg
    p = param.astype(F32)
    grad = grad.astype(F32) + coupled_decay * p  # as the first pass saw it
    denom = ops.sqrt(exp_avg_sq) + d * eps
    new = p - p * (decoupled_decay * dlr)
    if has_first_moment:
        new = new - dlr * exp_avg / denom
    else:
        new = new - dlr * d * grad / denom
    return _write(param, ops.select(ops.broadcast_to(proceed, p.shape), new, p))


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
        has_first_moment = beta1 > 0
        coupled_decay = _f32(0.0 if decouple else weight_decay)
        self.moments_cfg = (self.beta1, self.beta2, self.beta3, coupled_decay, has_first_moment)
        self.apply_cfg = (_f32(eps), coupled_decay, _f32(weight_decay if decouple else 0.0),
                          has_first_moment)
        self.d = Parameter(_f32(d0), name="prodigy.d", requires_grad=False)
        self.d_max = Parameter(_f32(d0), name="prodigy.d_max", requires_grad=False)
        self.d_numerator = Parameter(_f32(0.0), name="prodigy.d_numerator", requires_grad=False)
        self.p0 = ParameterTuple(Parameter(Tensor(p.asnumpy().astype(np.float32)), name=f"p0.{p.name}",
                                           requires_grad=False) for p in self.params)
        self.exp_avg = self.state("exp_avg", None, None if has_first_moment else _placeholder)
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
        # A Python loop (unrolled when compiled), not HyperMap: d needs the sum over all
        # parameters, and in MindSpore 2.7 graph mode HyperMap's outputs have no static dtype
        # while side effects of a HyperMap whose outputs are consumed were observed to be lost.
        sums = ops.zeros((2,), F32)
        for i in range(len(self.params)):
            sums = sums + _prodigy_moments(self.moments_cfg, d / self.d0, d, s_scale, lrs,
                                           self.group_ids[i], self.params[i], self.p0[i],
                                           self.exp_avg[i], self.exp_avg_sq[i], self.s[i], grads[i])
        delta_numerator = sums[0] * (d / self.d0) * dlr
        d_denom = sums[1]
        # prodigyopt returns before touching d or the parameters when sum|s| is 0
        proceed = d_denom > 0
        global_numerator = self.d_numerator * self.beta3 + delta_numerator
        d_hat = self.d_coef * global_numerator / ops.select(proceed, d_denom, ops.ones_like(d_denom))
        d_new = ops.select(ops.logical_and(proceed, d == self.d0), ops.maximum(d, d_hat), d)
        d_max_new = ops.maximum(d_max, d_hat)
        d_new = ops.minimum(d_max_new, d_new * self.growth_rate)
        ops.assign(self.d, ops.select(proceed, d_new, d))
        ops.assign(self.d_max, ops.select(proceed, d_max_new, d_max))
        ops.assign(self.d_numerator, ops.select(proceed, global_numerator, self.d_numerator))
        ops.assign(self.step_count, self.step_count + proceed.astype(ms.int32))
        return self.hyper_map(ops.partial(_prodigy_apply, self.apply_cfg, proceed, dlr, d_new),
                              self.params, self.exp_avg, self.exp_avg_sq, grads)
