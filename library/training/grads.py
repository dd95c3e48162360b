"""Gradient clipping by global norm and a dynamic loss scaler, for use inside the compiled step.

Order in the step (as kohya under accelerate): scale the loss -> grads -> unscale -> finite
check -> clip (if --max_grad_norm != 0) -> optimizer update unless an overflow was found ->
update the scale.
"""

import mindspore as ms
from mindspore import nn, ops, Parameter, Tensor

F32 = ms.float32

_square_sum = ops.MultitypeFuncGraph("square_sum")
_scale = ops.MultitypeFuncGraph("scale")


@_square_sum.register("Tensor")
def _square_sum_of(grad):
    g = grad.astype(F32)
    return (g * g).sum()


@_scale.register("Tensor", "Tensor")
def _scale_by(factor, grad):
    return (grad.astype(F32) * factor).astype(grad.dtype)


def clip_by_global_norm(grads, max_norm):
    """torch.nn.utils.clip_grad_norm_ (L2): scale all grads by min(1, max_norm / (norm + 1e-6)).

    Returns (clipped grads, the global norm before clipping). kohya clips every trainable
    parameter of the network together, with --max_grad_norm (default 1.0; 0 turns it off, so the
    step should not call this).
    """
    hyper_map = ops.HyperMap()
    # HyperMap outputs have no static dtype in graph mode; the cast gives them one
    total_norm = ops.sqrt(ops.stack(hyper_map(_square_sum, grads)).sum().astype(F32))
    factor = ops.minimum(max_norm / (total_norm + 1e-6), 1.0)
    return hyper_map(ops.partial(_scale, factor), grads), total_norm


class DynamicLossScaler(nn.Cell):
    """torch.amp.GradScaler's dynamic scale (accelerate's defaults) for fp16 training.

    On a step whose grads hold inf/NaN the update is skipped and the scale multiplied by
    `backoff_factor`; after `growth_interval` finite steps in a row it is multiplied by
    `growth_factor`. The scale, the run of good steps and the count of skipped steps are
    Parameters (`loss_scale.*`), saved with the training state; the count keeps the LR schedule
    behind by the skipped steps, as accelerate's scheduler, which does not step when the
    optimizer step was skipped.
    """

    def __init__(self, init_scale=2.0 ** 16, growth_factor=2.0, backoff_factor=0.5,
                 growth_interval=2000):
        super().__init__(auto_prefix=False)
        self.scale = Parameter(Tensor(init_scale, F32), name="loss_scale.scale", requires_grad=False)
        self.good_steps = Parameter(Tensor(0, ms.int32), name="loss_scale.good_steps",
                                    requires_grad=False)
        self.skipped_steps = Parameter(Tensor(0, ms.int32), name="loss_scale.skipped_steps",
                                       requires_grad=False)
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_interval = growth_interval
        self.hyper_map = ops.HyperMap()

    def scale_loss(self, loss):
        return loss * self.scale.astype(loss.dtype)

    def unscale(self, grads):
        return self.hyper_map(ops.partial(_scale, 1.0 / self.scale), grads)

    def all_finite(self, grads):
        """True when no gradient holds inf or NaN (a scalar bool tensor)."""
        # inf or NaN anywhere makes the sum of squares non-finite
        total = ops.stack(self.hyper_map(_square_sum, grads)).sum().astype(F32)
        return ops.isfinite(total)

    def update(self, finite):
        """Adjust the scale after a step; returns `finite` (the update was applied iff True)."""
        good = ops.select(finite, self.good_steps + 1, ops.zeros_like(self.good_steps))
        grow = good >= self.growth_interval
        scale = ops.select(finite, ops.select(grow, self.scale * self.growth_factor, self.scale),
                           self.scale * self.backoff_factor)
        ops.assign(self.good_steps, ops.select(grow, ops.zeros_like(good), good))
        ops.assign(self.scale, scale)
        ops.assign(self.skipped_steps, self.skipped_steps + ops.select(
            finite, ops.zeros_like(self.skipped_steps), ops.ones_like(self.skipped_steps)))
        return finite
