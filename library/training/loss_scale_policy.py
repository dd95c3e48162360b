"""fp16 loss scaling in the run: which runs scale, and what a skipped step does to the loop.

kohya trains fp16 under accelerate, which always wraps the optimizer in torch's GradScaler
(init scale 2**16, x2 after 2000 finite steps, x0.5 on an overflow); bf16 and fp32 are not
scaled. The scaler itself runs inside the compiled step (library.training.grad_ops,
library.training.step). On a step whose gradients overflow:

- the optimizer update is skipped (weights and optimizer state unchanged), the scale is halved;
- kohya's global step still counts it (train_network.py increments it whenever gradients were
  synchronised), so --max_train_steps, saving and the log count it too;
- the LR schedule does not advance: accelerate's AcceleratedScheduler.step returns early when
  the optimizer step was skipped. The schedule position is therefore global step minus the
  skipped steps, which the scaler counts in a Parameter saved with the training state.
"""

import logging

logger = logging.getLogger("sdxl_train_network")


def make_loss_scaler(args):
    """A DynamicLossScaler for --mixed_precision fp16 (with or without --full_fp16), else None."""
    if args.mixed_precision != "fp16":
        return None
    from library.training.grad_ops import DynamicLossScaler
    return DynamicLossScaler()


class LossScaleWatch:
    """Reads the scaler around each apply step: the schedule position, skipped steps, the scale."""

    def __init__(self, scaler, log):
        self.scaler, self.log = scaler, log
        self._before = 0

    def skipped(self):
        """Optimizer steps skipped so far (read from the scaler, so a restored state counts)."""
        return 0 if self.scaler is None else int(self.scaler.skipped_steps.asnumpy())

    def schedule_step(self, global_step):
        """Before an apply step: the LR schedule's position (accelerate's rule)."""
        self._before = self.skipped()
        return global_step - self._before

    def after_apply(self, global_step, epoch):
        """After it: this step's scalars ({} without a scaler); a skipped step is logged."""
        if self.scaler is None:
            return {}
        skipped, scale = self.skipped(), float(self.scaler.scale.asnumpy())
        if skipped > self._before:
            self.log.event("skipped_step", step=global_step, epoch=epoch, loss_scale=scale,
                           skipped_steps=skipped)
            logger.info(f"step {global_step}: gradients overflowed in fp16, the update was "
                        f"skipped and the loss scale lowered to {scale:g} ({skipped} skipped)")
        return {"loss_scale": scale, "skipped_steps": skipped}
