"""kohya's training loss: element-wise loss, mask, per-sample mean, per-sample weights.

Order (train_network.py:467-480, 330-339):
  element-wise loss (l2 / l1 / huber / smooth_l1 with a per-timestep huber c)
  -> × mask (--masked_loss or alpha masks; already resized to latent size)
  -> mean over C, H, W -> × loss_weights (prior_loss_weight of the sample's subset)
  -> × min-SNR weight -> × v-pred scale -> + v-pred-like term -> × debiased weight
  -> mean over the batch.

Every step after the per-sample mean multiplies the loss by a function of t alone (the
v-pred-like term, loss + loss/scale·v, is loss × (1 + v/scale)), so they are folded into one
per-timestep table computed on the host (`timestep_weights`); so is the huber c schedule
(`huber_c_per_timestep`), in library/training/loss_options.py. The compiled step only gathers
from the two tables.
"""

import mindspore as ms
from mindspore import nn, ops, Tensor

from library.training.loss_options import LossOptions, huber_c_per_timestep, timestep_weights
from library.training.noise_draws import DDPMSchedule


def elementwise_loss(pred, target, loss_type, huber_c=None):
    """kohya's `conditional_loss(..., reduction="none")`; huber_c broadcasts like the inputs."""
    diff = pred - target
    if loss_type == "l2":
        return diff * diff
    if loss_type == "l1":
        return ops.abs(diff)
    smooth = ops.sqrt(diff * diff + huber_c * huber_c) - huber_c
    if loss_type == "huber":
        return 2 * huber_c * smooth
    return 2 * smooth  # smooth_l1


class DiffusionLoss(nn.Cell):
    """`construct(pred, target, timesteps, loss_weights, mask=None) -> scalar loss`.

    `mask` is (B, 1, h, w) at latent size (see `resample.area_resize`); it is used only when the
    options say the loss is masked. `loss_weights` is (B,).
    """

    def __init__(self, options: LossOptions, schedule: DDPMSchedule):
        super().__init__()
        self.loss_type = options.loss_type
        self.masked = options.masked
        self.uses_huber_c = options.uses_huber_c
        self.huber_c = Tensor(huber_c_per_timestep(options, schedule))
        self.weights = Tensor(timestep_weights(options, schedule))

    def per_sample(self, pred, target, timesteps, loss_weights, mask=None):
        """The (B,) loss before the batch mean."""
        pred = pred.astype(ms.float32)
        target = target.astype(ms.float32)
        huber_c = None
        if self.uses_huber_c:
            huber_c = ops.gather(self.huber_c, timesteps, 0).reshape((-1,) + (1,) * (pred.ndim - 1))
        loss = elementwise_loss(pred, target, self.loss_type, huber_c)
        if self.masked:
            loss = loss * mask.astype(ms.float32)
        loss = loss.mean(axis=tuple(range(1, loss.ndim)))
        return loss * loss_weights * ops.gather(self.weights, timesteps, 0)

    def construct(self, pred, target, timesteps, loss_weights, mask=None):
        return self.per_sample(pred, target, timesteps, loss_weights, mask).mean()
