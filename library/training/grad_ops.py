"""Gradient clipping by global norm and a dynamic loss scaler, for use inside the compiled step.

Order in the step (as kohya under accelerate): scale the loss -> grads -> unscale -> global norm
-> finite check (from that norm: no second pass over the gradients) -> clip (if --max_grad_norm
!= 0) -> optimizer update unless an overflow was found -> update the scale. The functions take
any tuple of gradients; the apply step passes its flat buffers, one per parameter group.
"""

import mindspore as ms
from mindspore import nn, ops, Parameter, Tensor

F32 = ms.float32


def scale_all(grads, factor):
    """Every gradient times `factor` (a scalar), in its own dtype."""
    out = ()
    for grad in grads:
        out = out + ((grad.astype(F32) * factor).astype(grad.dtype),)
    return out


def global_norm(grads):
    """The L2 norm of all of `grads` together (a float32 scalar): one reduction per tensor, so
    over the apply step's flat buffers a few kernels in all. Not finite iff some gradient holds
    inf or NaN (or the squares overflow float32), which is how fp16 training detects overflow."""
    total = ops.zeros((), F32)
    for grad in grads:
        g = grad.astype(F32)
        total = total + (g * g).sum()
    return ops.sqrt(total)


def clip_to_norm(grads, norm, max_norm):
    """torch.nn.utils.clip_grad_norm_ (L2) given the global norm: scale all grads by
    min(1, max_norm / (norm + 1e-6)). kohya clips every trainable parameter of the network
    together, with --max_grad_norm (default 1.0; 0 turns it off: pass inf)."""
    return scale_all(grads, ops.minimum(max_norm / (norm + 1e-6), 1.0))


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

    def scale_loss(self, loss):
        return loss * self.scale.astype(loss.dtype)

    def update(self, finite):
        """Adjust the scale after a step; returns `finite` (the update was applied iff True)."""
        good = ops.select(finite, self.good_steps + 1, ops.zeros_like(self.good_steps))
        grow = good >= self.growth_interval
        scale = ops.select(finite, ops.select(grow, self.scale * self.growth_factor, self.scale),
                           self.scale * self.backoff_factor)
        self.good_steps.copy_(ops.select(grow, ops.zeros_like(good), good))
        self.scale.copy_(scale)
        self.skipped_steps.copy_(self.skipped_steps + ops.select(
            finite, ops.zeros_like(self.skipped_steps), ops.ones_like(self.skipped_steps)))
        return finite
