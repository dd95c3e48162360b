"""sdxl_train_network.py's run, in kohya's order: check everything that can be checked cheaply,
load the model, add the LoRA, build the dataset and caches, then train and save.

    plan = prepare(args)   # library/training/plan.py: no model loaded, every argument and
                           # dataset error surfaces here
    train(plan)            # -> the path of the final LoRA file

The pieces: plan.py (checks, dataset, step counts), build.py (models, dtypes, caches, LoRA,
optimizer, schedule, step cells), compile.py (the step graphs before step 1), checkpoints.py
(saves, rotation, states, resume); this module runs the epochs and steps between them.

A step's randomness is drawn on the host from generators seeded by --seed (noise, timesteps,
the VAE sample, captions and augmentation through the dataset's per-sample RNGs), so the same
seed and inputs give the same LoRA file.
"""

import logging
import math
import os
import time

import numpy as np

from library.errors import UserError
from library.training.batches import to_tensors

logger = logging.getLogger("sdxl_train_network")


class TrainingStopped(UserError):
    """The run cannot go on (a non-finite loss): the message says where and why."""


def train(plan):
    """Ctrl-C or SIGTERM stop the run after the current step, with an -interrupted save."""
    from library.training import distributed
    from library.training.interrupts import StopRequests
    # Not under msrun: the ranks would stop at different steps and then wait for each other in
    # the next collective (and msrun answers Ctrl-C by SIGKILLing them anyway).
    with StopRequests(enabled=not distributed.world().distributed) as stop:
        return _train(plan, stop)


def _train(plan, stop):
    import mindspore as ms
    from tqdm import tqdm
    from library.training import build, distributed
    from library.training import filenames as names
    from library.training.checkpoints import Checkpoints, Progress
    from library.training.compile import CompileRecord, step_graphs
    from library.training.logs import RunLog, draw_loss_curve, tensorboard_dir
    from library.training.loss_scale_policy import LossScaleWatch
    from library.training.run_metadata import run_metadata
    from library.training.samples import TrainingSampler
    from library.training.saving import warn_if_caches_short, warn_if_disk_short
    from library.training.validation import Validation

    args = plan.args
    world = distributed.init()
    if world.is_main and (args.cache_latents_to_disk or args.cache_text_encoder_outputs_to_disk):
        warn_if_caches_short(args, plan)
    t = build.build_training(plan, build.load_models(args))
    network, groups, schedule, assembler, loader = t.network, t.groups, t.schedule, t.assembler, t.loader
    trainable = list(t.grad_step.trainable)

    te_lr = args.text_encoder_lr[0] if args.text_encoder_lr else None
    metadata = run_metadata(args, plan.train_group, plan.val_group, t.optimizer.ss_optimizer,
                            plan.net_kwargs, plan.num_epochs, len(loader), te_lr, args.unet_lr)
    name = args.output_name or names.DEFAULT_LAST_NAME
    # data parallel: rank 0 writes every file; the other ranks train and log nowhere
    log = RunLog(os.path.join(args.output_dir, f"{name}_log.jsonl"),
                 tensorboard_dir(args.logging_dir, args.log_prefix)) if world.is_main \
        else RunLog(os.devnull)
    log.event("start", seed=args.seed, max_train_steps=args.max_train_steps,
              num_epochs=plan.num_epochs, buckets=[list(s) for s in plan.train_group.bucket_shapes()],
              trainable_tensors=len(trainable), groups=[g.description for g in groups])
    if plan.bucket_cap is not None:
        log.event("bucket_cap", **plan.bucket_cap.as_dict())
    sample = TrainingSampler(args, t.models, log=log, writer=world.is_main)
    validation = Validation(plan, t, compile=not args.pynative, log=log)
    progress = Progress()
    saves = Checkpoints(plan, t, world, log, metadata, progress)
    if world.is_main:
        warn_if_disk_short(args, plan, trainable, t.apply_step, saves.save_dtype, sample.prompts)
    start_epoch = saves.resume()    # before any step graph runs (it writes Parameters)

    logger.info(f"training: {plan.train_group.num_batches()} batches per epoch, "
                f"{plan.num_epochs} epochs, {args.max_train_steps} optimizer steps, "
                f"{len(trainable)} LoRA tensors in {len(groups)} groups, buckets "
                f"{plan.train_group.bucket_shapes()}")
    accumulation = ms.Tensor(float(args.gradient_accumulation_steps), ms.float32)
    scaling = LossScaleWatch(t.apply_step.loss_scaler, log)
    if args.pynative:
        grad_fn, apply_fn, compiles = t.grad_step, t.apply_step, CompileRecord(log, dynamic=False)
    else:
        grad_fn, apply_fn, compiles = step_graphs(plan, t, accumulation, log)
    apply_compiled = args.pynative or compiles.graphs > 0
    bar = tqdm(total=args.max_train_steps, initial=progress.step, desc="steps", smoothing=0,
               dynamic_ncols=True, disable=not world.is_main)
    epoch = start_epoch - 1
    stop.start_training()
    try:
        if progress.step == 0:
            sample(0, 0)   # --sample_at_first (a resumed run does not sample first, as kohya)
        for epoch in range(start_epoch, plan.num_epochs + 1):
            network.on_epoch_start()
            micro = 0
            epoch_losses = []       # this epoch's batch losses, for kohya's loss/epoch_average
            # the epoch's first step number (a resumed epoch has done some of its batches)
            position = loader.state_dict()
            done = position["batch"] // world.size if position["epoch"] == epoch else 0
            first_step = progress.step - done // args.gradient_accumulation_steps
            for batch in loader.epoch(epoch, first_step, args.gradient_accumulation_steps):
                arrays, _ = assembler(batch)
                shape = tuple(arrays[0].shape)
                t0 = time.time()
                loss, per_sample = grad_fn(*to_tensors(arrays))
                loss = distributed.mean_scalar(world, float(loss.asnumpy()))   # over the ranks
                if not args.pynative and not compiles.covers(shape):    # --static_shapes
                    compiles.add("grad_step", time.time() - t0, shape)
                    logger.info(f"compiled the step for input shape {shape} in "
                                f"{time.time() - t0:.1f} s ({compiles.graphs} graph(s) so far)")
                if not math.isfinite(loss):
                    paths = ", ".join(s["path"] for s in batch)
                    raise TrainingStopped(
                        f"the loss became {loss} at step {progress.step + 1} (epoch {epoch}); the "
                        f"batch's images: {paths}. Nothing was saved from this step: lower the "
                        "learning rate, or check these images")
                micro += 1
                progress.add_loss(loss)
                epoch_losses.append(loss)
                if micro % args.gradient_accumulation_steps:
                    continue
                lrs = schedule.lrs(scaling.schedule_step(progress.step))
                t1 = time.time()
                grad_norm = float(apply_fn(ms.Tensor(lrs), accumulation).asnumpy())
                if not apply_compiled:      # its first call: the compile and one update
                    apply_compiled = True
                    compiles.add("apply_step", time.time() - t1)
                progress.step += 1
                step_seconds = time.time() - t0
                scalars = {"loss/current": loss, "loss/average": progress.average_loss,
                           "grad_norm": grad_norm, "seconds_per_step": step_seconds}
                scalars.update({f"lr/{g.description}": float(lr) for g, lr in zip(groups, lrs)})
                scalars.update(scaling.after_apply(progress.step, epoch))
                scalars.update(validation.at_step(progress.step, progress.average_loss))
                log.step(progress.step, scalars)
                bar.update(1)
                bar.set_postfix(epoch=epoch, avr_loss=f"{progress.average_loss:.4f}",
                                lr=f"{float(lrs[0]):.2e}", s_step=f"{step_seconds:.2f}",
                                **validation.postfix)
                sample(progress.step)
                # as kohya, also at the last step (the final file is written besides)
                if args.save_every_n_steps and progress.step % args.save_every_n_steps == 0:
                    saves.every("step", progress.step, epoch)
                if progress.step >= args.max_train_steps:
                    break
                if stop.requested.is_set():
                    saves.interrupted(epoch)
            if epoch_losses:
                log.epoch(epoch, {"loss/epoch_average": float(np.mean(epoch_losses))})
            validation.at_epoch(epoch, progress.step, progress.average_loss)
            if args.save_every_n_epochs and epoch % args.save_every_n_epochs == 0 \
                    and epoch < plan.num_epochs:
                saves.every("epoch", epoch, epoch)
            sample(progress.step, epoch)
            if progress.step >= args.max_train_steps:
                break
        final = saves.last(epoch)
    finally:
        bar.close()
        loader.close()
        validation.close()
        if log.losses and world.is_main:
            try:
                draw_loss_curve(log.losses, os.path.join(args.output_dir, f"{name}_loss.png"),
                                title=f"{name}: loss per step")
            except OSError as e:    # a full disk: the reason the run ends is reported already
                logger.warning(f"could not write the loss curve: {e.strerror or e}")
        if plan.bucket_cap is not None:
            log.event("bucket_cap_savings", estimated_compile_seconds_saved=(
                plan.bucket_cap.estimated_seconds_saved(
                compiles.grad_seconds if args.static_shapes else [])))
        log.event("end", steps=progress.step, skipped_steps=scaling.skipped(), **compiles.totals())
        log.close()
    logger.info(f"saved {final} ({progress.step} steps, {compiles.graphs} step graph(s) compiled, "
                f"{compiles.hits} from the compile cache)")
    return final
