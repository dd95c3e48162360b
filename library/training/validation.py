"""Validation loss during training: kohya's --validate_every_n_steps, --validate_every_n_epochs
and --max_validation_steps over the images --validation_split holds out (library/data builds the
split; here it is never mixed with training images, while kohya's overlaps without a seed).

    validation = Validation(plan, training, compile=not args.pynative, log=log)
    scalars.update(validation.at_step(step, train_average))    # {} when not due
    validation.at_epoch(epoch, step, train_average)            # logs its scalars when due

kohya's semantics (train_network.py:1361-1367, 1534-1682):
- each validation batch is evaluated at the fixed timesteps linspace(min_t, max_t, 6)[1:-1]
  (200, 400, 600, 800 by default) with the run's noise and loss options; the random numbers are
  drawn from --validation_seed (else --seed), so every validation sees the same noise and the
  losses are comparable from one validation to the next;
- at most --max_validation_steps batches;
- after an optimizer step when the step is a multiple of --validate_every_n_steps; at the end of
  every epoch, or of every --validate_every_n_epochs-th epoch;
- scalars `loss/validation/step_average`, `loss/validation/step_divergence` (at the step) and
  `loss/validation/epoch_average`, `loss/validation/epoch_divergence` (at the epoch); the
  divergence is the validation average minus the training loss average.
One difference: an average here is the mean over this validation's batches and timesteps; kohya's
recorder keeps adding the validations of the first epoch into one running mean.

The loss is the train step's forward (GradStep.forward_loss), compiled on its own: one graph for
every batch shape (by the train step's rule: static for a single shape or --static_shapes). No
gradients, no buffer or parameter is written. The models are in eval mode while it runs (LoRA
dropouts off, as kohya's network.eval()).
"""

import argparse
import dataclasses
import logging
import time

import numpy as np

from library.errors import UserError

logger = logging.getLogger(__name__)

NUM_TIMESTEPS = 4
# Validation batches are keyed (0, timestep index, batch index): training epochs start at 1, so
# no validation draw repeats a training one.
VALIDATION_EPOCH = 0


def validation_timesteps(min_timestep, max_timestep):
    """kohya's fixed validation timesteps: np.linspace(min, max, 6, dtype=int)[1:-1]."""
    return [int(t) for t in np.linspace(min_timestep, max_timestep, NUM_TIMESTEPS + 2, dtype=int)[1:-1]]


def check_validation_options(args, val_group):
    """Parse-time checks: a validation option without a validation set would do nothing."""
    for name in ("validate_every_n_steps", "validate_every_n_epochs", "max_validation_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be 1 or more, got {value}")
    if val_group is None:
        asked = [n for n in ("validate_every_n_steps", "validate_every_n_epochs",
                             "max_validation_steps") if getattr(args, n) is not None]
        if asked:
            raise UserError(f"--{asked[0]} needs a validation set: set --validation_split (or "
                            f"`validation_split` in the dataset config) above 0")


def validation_caches(val_group, models, args):
    """(latent cache, text cache) for the validation images, made as the training caches are."""
    if val_group is None:
        return None, None
    from library.training.cache_encoders import cache_latents, cache_text_outputs
    latents = cache_latents(val_group, models, args) if args.cache_latents else None
    text = cache_text_outputs(val_group, models, args) if args.cache_text_encoder_outputs else None
    return latents, text


class Validation:
    """Runs the validation loss when due. `enabled` is False without a validation set."""

    def __init__(self, plan, training, compile=True, log=None):
        args = plan.args
        self.args = args
        self.enabled = plan.val_group is not None
        self.log = log
        self.postfix = {}       # for the progress bar: the last validation loss
        self.compiled = {}
        if not self.enabled:
            return
        import mindspore as ms
        from library.data.loader import BatchLoader
        from library.training.step import ForwardLoss
        from library.training.batches import BatchAssembler
        from library.training.noise_draws import NoiseSampler

        self.models = training.models
        self.seed = args.validation_seed if args.validation_seed is not None else args.seed
        latent_cache, text_cache = training.validation_caches
        self.loader = BatchLoader(plan.val_group, self.seed, args.max_data_loader_n_workers,
                                  args.persistent_data_loader_workers, args.max_train_steps,
                                  latent_cache=latent_cache, text_cache=text_cache)
        self.batches = len(self.loader) if args.max_validation_steps is None else \
            min(args.max_validation_steps, len(self.loader))
        self.timesteps = validation_timesteps(*plan.noise_options.timestep_range)
        seeded = argparse.Namespace(**{**vars(args), "seed": self.seed})    # the VAE sample's seed
        layout, tokenizers = training.assembler.layout, training.assembler.tokenizers
        self.assemblers = [
            BatchAssembler(self.models, layout, NoiseSampler(dataclasses.replace(
                plan.noise_options, min_timestep=t, max_timestep=t), self.seed), seeded, tokenizers)
            for t in self.timesteps]
        self.layout = layout
        self.forward_cell = ForwardLoss(training.grad_step)
        self.forward = ms.jit(self.forward_cell.construct) if compile else self.forward_cell
        self.compile = compile
        from library.training.compile import uses_dynamic_shapes
        self.dynamic = compile and uses_dynamic_shapes(args, plan.val_group)

    def close(self):
        if self.enabled:
            self.loader.close()

    def run(self, step):
        """The mean validation loss over (batch, timestep); nothing is written to any parameter."""
        from tqdm import tqdm
        from library.training.samples import eval_mode

        m = self.models
        losses = []
        bar = tqdm(total=self.batches * len(self.timesteps), desc="validation", leave=False,
                   dynamic_ncols=True)
        batches = self.loader.epoch(1, step)
        try:
            with eval_mode(m.unet, m.text_encoder1, m.text_encoder2):
                for index, batch in enumerate(batches):
                    if index >= self.batches:
                        break
                    for ti, (t, assembler) in enumerate(zip(self.timesteps, self.assemblers)):
                        for sample in batch:
                            sample["batch_key"] = (VALIDATION_EPOCH, ti, index)
                        arrays, _ = assembler(batch)
                        losses.append(self._loss(arrays))
                        bar.update(1)
                        bar.set_postfix(val_avg_loss=f"{np.mean(losses):.4f}", timestep=t)
        finally:
            batches.close()
            bar.close()
        return float(np.mean(losses))

    def _loss(self, arrays):
        from library.training.batches import to_tensors
        from library.training.step import dynamic_signature
        tensors = to_tensors(arrays)
        shape = tuple(arrays[0].shape)
        if self.dynamic:
            if not self.compiled:       # before the first (and only) compile
                self.forward_cell.set_inputs(*dynamic_signature(tensors, self.layout))
            shape = tuple(self.forward_cell.get_inputs()[0].shape)
        start = time.time()
        loss = float(self.forward(*tensors)[0].asnumpy())
        if self.compile and shape not in self.compiled:
            self.compiled[shape] = time.time() - start
            if self.log is not None:
                self.log.event("compile", graph="validation", shape=list(shape),
                               seconds=self.compiled[shape], count=len(self.compiled))
            logger.info("compiled the validation loss for input shape %s in %.1f s", shape,
                        self.compiled[shape])
        return loss

    def _scalars(self, kind, step, train_average):
        average = self.run(step)
        self.postfix = {"val_loss": f"{average:.4f}"}
        return {f"loss/validation/{kind}_average": average,
                f"loss/validation/{kind}_divergence": average - train_average}

    def at_step(self, step, train_average):
        """The step scalars when --validate_every_n_steps is due at `step`, else {}."""
        n = self.args.validate_every_n_steps
        if not self.enabled or not n or step == 0 or step % n:
            return {}
        return self._scalars("step", step, train_average)

    def at_epoch(self, epoch, step, train_average):
        """At the end of `epoch` (1-based): validate if due and log the epoch scalars."""
        n = self.args.validate_every_n_epochs
        if not self.enabled or (n and epoch % n):
            return {}
        scalars = self._scalars("epoch", step, train_average)
        if self.log is not None:
            self.log.epoch(epoch, scalars)
        return scalars


def add_validation_arguments(parser):
    """kohya's validation options (train_network.py:1872-1896); --validation_split and
    --validation_seed belong to the dataset options (library/data/config.py)."""
    a = parser.add_argument
    a("--validate_every_n_steps", type=int, default=None,
      help="compute the validation loss every N optimizer steps (as well as at epoch ends)")
    a("--validate_every_n_epochs", type=int, default=None,
      help="compute the validation loss at the end of every N-th epoch (default: every epoch "
           "when there is a validation set)")
    a("--max_validation_steps", type=int, default=None,
      help="at most this many validation batches per validation (default: all)")
