"""sdxl_train_network.py's run, in kohya's order: check everything that can be checked cheaply,
load the model, add the LoRA, build the dataset and caches, then train and save.

    prepare(args)  -> a Plan (no model loaded: every argument and dataset error surfaces here)
    train(plan)    -> the path of the final LoRA file

A step's randomness is drawn on the host from generators seeded by --seed (noise, timesteps,
the VAE sample, captions and augmentation through the dataset's per-sample RNGs), so the same
seed and inputs give the same LoRA file.
"""

import logging
import math
import os
import random
import time
from dataclasses import dataclass

import numpy as np

from library.errors import UserError
from library.training.batches import BatchAssembler, to_tensors

logger = logging.getLogger("sdxl_train_network")

class TrainingStopped(UserError):
    """The run cannot go on (a non-finite loss): the message says where and why."""


# --- checks before any heavy work -------------------------------------------------------------

def _check_output_dir(path):
    if not path:
        raise UserError("--output_dir is required: the folder the LoRA is written to")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"--output_dir {path} is not writable: {e.strerror}") from None
    from library.training.samples import SAMPLE_DIR
    from library.training.saving import remove_stale_temp
    for folder in (path, os.path.join(path, SAMPLE_DIR)):
        remove_stale_temp(folder)


def _check_model_path(value):
    if not value:
        raise UserError("--pretrained_model_name_or_path is required: an SDXL .safetensors file, "
                        "a diffusers folder or a Hugging Face hub id")
    from library.file_checks import is_hub_id, refuse_pickle
    if os.path.exists(value):
        if os.path.isfile(value):
            refuse_pickle(value)
        return
    if not is_hub_id(value):
        raise UserError(f"--pretrained_model_name_or_path {value}: file not found")


def _check_contradictions(args):
    if args.network_module != "networks.lora":
        raise UserError(f"--network_module {args.network_module!r}: only networks.lora is supported")
    if args.network_train_unet_only and args.network_train_text_encoder_only:
        raise UserError("--network_train_unet_only and --network_train_text_encoder_only "
                        "exclude each other")
    if args.full_fp16 and args.full_bf16:
        raise UserError("--full_fp16 and --full_bf16 exclude each other")
    if args.full_fp16 and args.mixed_precision != "fp16":
        raise UserError("--full_fp16 needs --mixed_precision fp16 (as kohya)")
    if args.mixed_precision == "bf16" or args.full_bf16:
        from library import device
        if not device.has_bf16_matmul():
            what, instead = ("--full_bf16", "--mixed_precision fp16 --full_fp16") if args.full_bf16 \
                else ("--mixed_precision bf16", "--mixed_precision no or fp16")
            raise UserError(f"{what} needs an Ascend NPU: MindSpore has no bfloat16 matmul kernel "
                            f"on CPU; use {instead}")
    if args.full_bf16 and args.mixed_precision != "bf16":
        raise UserError("--full_bf16 needs --mixed_precision bf16 (as kohya)")
    if args.save_model_as != "safetensors":
        raise UserError(f"--save_model_as {args.save_model_as}: only safetensors is written (kohya's "
                        f"ckpt and pt are pickle files, which can run code when loaded); "
                        f"drop the option or pass safetensors")
    if args.log_with == "tensorboard" and not args.logging_dir:
        raise UserError("--log_with tensorboard needs --logging_dir (kohya: logging_dir is required "
                        "when log_with is tensorboard)")
    for name in ("sdpa", "xformers", "mem_eff_attn"):
        if getattr(args, name):
            logger.info(f"--{name} has no effect here: attention is chosen per device by "
                        f"library/layers.py (Ascend's flash attention on NPUs, math attention on CPU)")
    if args.gradient_accumulation_steps < 1:
        raise UserError("--gradient_accumulation_steps must be 1 or more")
    if args.max_train_steps < 1 and not args.max_train_epochs:
        raise UserError("--max_train_steps must be 1 or more")
    if args.text_encoder_lr and len(args.text_encoder_lr) > 2:
        raise UserError("--text_encoder_lr takes one value (both text encoders) or two (TE1 TE2)")
    if args.clip_skip is not None:
        logger.warning("--clip_skip has no effect on SDXL (as in kohya); it is only written to "
                       "the metadata")
    if args.compile_all_buckets_first and args.pynative:
        raise UserError("--compile_all_buckets_first has nothing to compile with --pynative")
    if args.compile_all_buckets_first and not args.static_shapes:
        raise UserError("--compile_all_buckets_first applies to --static_shapes only: the default "
                        "step is one graph for every batch shape, always compiled before step 1")
    if args.static_shapes and args.pynative:
        raise UserError("--static_shapes is about compiled graphs; --pynative compiles none")
    if args.debug_dataset:
        raise UserError("--debug_dataset: use `python tools/inspect_dataset.py` with the same "
                        "dataset options to see what the dataset builds")


@dataclass
class Plan:
    args: object
    train_group: object
    val_group: object
    noise_options: object
    loss_options: object
    schedule_options: object
    net_kwargs: dict
    num_update_steps_per_epoch: int
    num_epochs: int
    resume: object = None      # the progress record of the --resume state folder
    bucket_cap: object = None       # library.data.bucket_cap.BucketCap with --max_bucket_count


def prepare(args):
    """Everything that needs no model: arguments, contradictions, the dataset (images are only
    opened for their size), the step counts. MindSpore is not imported yet (about 2 s): a bad
    option or path fails at once."""
    from library.data.cache import check_cache_options
    from library.data.config import resolve_dataset_configs
    from library.data.dataset import build_dataset_groups
    from library.training.loss_options import LossOptions
    from library.training.noise import NoiseOptions
    from library.training.optim import check_optimizer_options
    from library.training.samples import check_sample_options
    from library.training.schedules import LRScheduleOptions
    from library.training.validation import check_validation_options
    from library.data.loader import batches_per_rank
    from library.training.world import world_from_env
    from library.lora.args import parse_network_args

    world = world_from_env(os.environ)     # msrun's ranks (one process without msrun)
    _check_contradictions(args)
    _check_model_path(args.pretrained_model_name_or_path)
    if args.vae and not os.path.exists(args.vae):
        raise UserError(f"--vae {args.vae}: file not found")
    if args.network_weights and not os.path.isfile(args.network_weights):
        raise UserError(f"--network_weights {args.network_weights}: file not found")
    if args.network_weights:
        from library.file_checks import refuse_non_finite
        refuse_non_finite(args.network_weights)    # before the model load, not after
    _check_output_dir(args.output_dir)
    from library.arg_checks import check_folder_can_be_made
    if args.output_name and os.path.basename(args.output_name) != args.output_name:
        raise UserError(f"--output_name {args.output_name}: a file name, not a path; put the "
                        "folder in --output_dir")
    if args.logging_dir:
        check_folder_can_be_made(args.logging_dir, "--logging_dir")

    check_optimizer_options(args.optimizer_type, args.optimizer_args, args.use_8bit_adam,
                            use_lion_optimizer=args.use_lion_optimizer)
    net_kwargs = parse_network_args(args.network_args)     # checks the keys and their values
    noise_options = NoiseOptions(
        noise_offset=args.noise_offset, noise_offset_random_strength=args.noise_offset_random_strength,
        adaptive_noise_scale=args.adaptive_noise_scale,
        multires_noise_iterations=args.multires_noise_iterations,
        multires_noise_discount=args.multires_noise_discount, ip_noise_gamma=args.ip_noise_gamma,
        ip_noise_gamma_random_strength=args.ip_noise_gamma_random_strength,
        min_timestep=args.min_timestep, max_timestep=args.max_timestep)
    schedule_options = LRScheduleOptions(
        lr_scheduler=args.lr_scheduler, lr_warmup_steps=args.lr_warmup_steps,
        lr_decay_steps=args.lr_decay_steps, lr_scheduler_num_cycles=args.lr_scheduler_num_cycles,
        lr_scheduler_power=args.lr_scheduler_power,
        lr_scheduler_timescale=args.lr_scheduler_timescale,
        lr_scheduler_min_lr_ratio=args.lr_scheduler_min_lr_ratio)

    resume = None
    if args.resume:
        from library.training.state import read_progress
        resume = read_progress(args.resume)
        if args.seed is None:
            args.seed = resume["seed"]      # the resumed run's data order and noise need it
    if args.seed is None:
        args.seed = random.randint(0, 2 ** 32 - 1)   # kohya draws one too; it is logged and saved
        if world.distributed:   # msrun: rank 0's seed for all (MindSpore is imported by then)
            from library.training import distributed
            args.seed = distributed.rank0_int(world, args.seed)
    train_group, val_group = build_dataset_groups(resolve_dataset_configs(args), seed=args.seed)
    bucket_cap = None
    if args.max_bucket_count is not None:
        from library.data.bucket_cap import cap_buckets
        bucket_cap = cap_buckets(train_group, args.max_bucket_count, val_group)
    if args.cache_text_encoder_outputs_to_disk:
        args.cache_text_encoder_outputs = True
    if args.cache_latents_to_disk:
        args.cache_latents = True
    if args.cache_text_encoder_outputs and not args.network_train_unet_only:
        raise UserError("--cache_text_encoder_outputs needs --network_train_unet_only: text "
                        "encoder LoRA training needs the encoders in the step (as kohya)")
    check_cache_options(args, [g for g in (train_group, val_group) if g is not None])
    check_sample_options(args)
    check_validation_options(args, val_group)
    # as kohya, any mask (alpha_mask, or mask images with --masked_loss) masks the loss
    masked = any(s.masked for ds in train_group.datasets for s, _, _ in ds.subset_images)
    if args.masked_loss and not masked:
        logger.warning("--masked_loss: no subset has mask images (conditioning_data_dir) or alpha_mask, "
                       "so nothing is masked (as in kohya)")
    loss_options = LossOptions(
        loss_type=args.loss_type, huber_schedule=args.huber_schedule, huber_c=args.huber_c,
        huber_scale=args.huber_scale, masked=masked, min_snr_gamma=args.min_snr_gamma,
        v_parameterization=args.v_parameterization,
        scale_v_pred_loss_like_noise_pred=args.scale_v_pred_loss_like_noise_pred,
        v_pred_like_loss=args.v_pred_like_loss,
        debiased_estimation_loss=args.debiased_estimation_loss)

    batches = train_group.num_batches()
    if batches == 0:
        raise UserError("the dataset has no batches: check the image folders and num_repeats")
    # under msrun each rank runs its share of the batches (kohya: len(dataloader)/num_processes)
    per_epoch = math.ceil(batches_per_rank(batches, world.size) / args.gradient_accumulation_steps)
    if args.max_train_epochs:
        args.max_train_steps = args.max_train_epochs * per_epoch
    num_epochs = math.ceil(args.max_train_steps / per_epoch)
    if args.save_n_epoch_ratio:
        args.save_every_n_epochs = math.floor(num_epochs / args.save_n_epoch_ratio) or 1
    if resume is not None:
        from library.training.state import check_compatible
        check_compatible(resume, args.resume, args, world.size)
        if "dataset" in resume:     # states saved before it was recorded have none
            from library.data.fingerprint import dataset_changes
            for line in dataset_changes(resume["dataset"], train_group, resume["data_position"]):
                logger.warning(line)
    return Plan(args, train_group, val_group, noise_options, loss_options, schedule_options,
                net_kwargs, per_epoch, num_epochs, resume, bucket_cap)


# --- the run ----------------------------------------------------------------------------------

def _weight_dtypes(args):
    import mindspore as ms
    weight = {"no": ms.float32, "fp16": ms.float16, "bf16": ms.bfloat16}[args.mixed_precision]
    lora = weight if (args.full_fp16 or args.full_bf16) else ms.float32
    vae = ms.float32 if args.no_half_vae else weight
    return weight, lora, vae


def _build_network(args, models, net_kwargs, lora_dtype):
    from networks import lora
    te = [models.text_encoder1, models.text_encoder2]
    if args.network_weights and args.dim_from_weights:
        network, weights = lora.create_network_from_weights(1.0, args.network_weights, models.vae,
                                                            te, models.unet, **net_kwargs)
    else:
        network = lora.create_network(1.0, args.network_dim, args.network_alpha, models.vae, te,
                                      models.unet, neuron_dropout=args.network_dropout,
                                      **net_kwargs)
        weights = None
    network.apply_to(te, models.unet, apply_text_encoder=not args.network_train_unet_only,
                     apply_unet=not args.network_train_text_encoder_only)
    for p in network.get_trainable_params():    # --full_fp16 / --full_bf16
        if p.dtype != lora_dtype:
            p.set_dtype(lora_dtype)
    if args.network_weights:
        if weights is None:
            network.load_weights(args.network_weights)
        else:
            network.load_state_dict(weights, source=args.network_weights)
        logger.info(f"loaded LoRA weights from {args.network_weights}")
    return network


@dataclass
class Training:
    """Everything a run steps through, built from a Plan and loaded models."""
    models: object
    network: object
    groups: list
    optimizer: object          # library.training.optim.BuiltOptimizer
    schedule: object
    grad_step: object
    apply_step: object
    assembler: object
    loader: object
    latent_cache: object
    text_cache: object
    validation_caches: tuple = (None, None)


def load_models(args):
    from library.models import load_sdxl
    start = time.time()
    models = load_sdxl(args.pretrained_model_name_or_path, dtype="float32")
    if args.vae:
        models.vae = load_sdxl(args.vae).vae
    logger.info(f"loaded {args.pretrained_model_name_or_path} ({models.config.name}) in "
                f"{time.time() - start:.1f} s")
    for cell in (models.unet, models.text_encoder1, models.text_encoder2, models.vae):
        for p in cell.get_parameters():
            p.requires_grad = False
    return models


def build_training(plan, models):
    """Caches, LoRA, optimizer, schedule and the two step Cells (not compiled yet)."""
    import mindspore as ms
    from library.training.cache_encoders import cache_latents, cache_text_outputs
    from library.data.loader import BatchLoader
    from library.text import load_tokenizers
    from library.training.losses import DiffusionLoss
    from library.training.loss_scale import make_loss_scaler
    from library.training.noise import NoiseSampler, ddpm_schedule
    from library.training.noising import ForwardDiffusion
    from library.training.optim import build_optimizer
    from library.training.schedules import LRSchedule
    from library.training.step import ApplyStep, GradStep, StepLayout
    from library.training.validation import validation_caches
    from library.training import distributed

    args = plan.args
    world = distributed.world()
    ms.set_seed(args.seed)
    weight_dtype, lora_dtype, vae_dtype = _weight_dtypes(args)
    # caches use the frozen models before any LoRA is added
    latent_cache = cache_latents(plan.train_group, models, args, world=world) \
        if args.cache_latents else None
    text_cache = cache_text_outputs(plan.train_group, models, args, world=world) \
        if args.cache_text_encoder_outputs else None
    val_caches = validation_caches(plan.val_group, models, args)

    _cast_frozen(models, weight_dtype, vae_dtype)
    network = _build_network(args, models, plan.net_kwargs, lora_dtype)
    if args.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
        if not args.network_train_unet_only:
            models.text_encoder1.enable_gradient_checkpointing()
            models.text_encoder2.enable_gradient_checkpointing()

    groups = network.param_groups(args.text_encoder_lr, args.unet_lr, args.learning_rate)
    if not groups:
        raise UserError("no parameter has a learning rate above 0: check --unet_lr, "
                        "--text_encoder_lr and --learning_rate")
    built = build_optimizer(groups, args.learning_rate, args.optimizer_type, args.optimizer_args,
                            args.lr_scheduler, use_8bit_adam=args.use_8bit_adam,
                            use_lion_optimizer=args.use_lion_optimizer)
    schedule_options = plan.schedule_options
    if built.lr_scheduler != schedule_options.lr_scheduler:
        schedule_options = type(schedule_options)(**{**schedule_options.__dict__,
                                                     "lr_scheduler": built.lr_scheduler})
    schedule = LRSchedule(schedule_options, [g.lr for g in groups], args.max_train_steps,
                          args.learning_rate)

    layout = StepLayout(latents_cached=latent_cache is not None, text_cached=text_cache is not None,
                        weighted=bool(args.weighted_captions), masked=plan.loss_options.masked)
    ddpm = ddpm_schedule()
    scaler = make_loss_scaler(args)     # fp16 only
    flat = built.optimizer.layout    # the trainable parameters as the optimizer lays them out
    grad_step = GradStep(models, flat, ForwardDiffusion(ddpm, plan.noise_options,
                                                        args.v_parameterization),
                         DiffusionLoss(plan.loss_options, ddpm), layout, weight_dtype, vae_dtype,
                         None if scaler is None else scaler.scale)
    apply_step = ApplyStep(grad_step.grad_buffers, built.optimizer, args.max_grad_norm, scaler,
                           distributed.gradient_mean(world))
    network.on_epoch_start()
    assembler = BatchAssembler(models, layout, NoiseSampler(plan.noise_options, args.seed), args,
                               load_tokenizers())
    loader = BatchLoader(plan.train_group, args.seed, args.max_data_loader_n_workers,
                         args.persistent_data_loader_workers, args.max_train_steps,
                         latent_cache=latent_cache, text_cache=text_cache, rank=world.rank,
                         world_size=world.size)
    return Training(models, network, groups, built, schedule, grad_step, apply_step, assembler,
                    loader, latent_cache, text_cache, val_caches)


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
    from library.training import filenames as names
    from library.training.compile import CompileRecord, step_graphs
    from library.training.logs import RunLog, draw_loss_curve, tensorboard_dir
    from library.training.loss_scale import LossScaleWatch
    from library.training.run_metadata import at_save, run_metadata
    from library.training import distributed
    from library.data.fingerprint import dataset_record
    from library.training.interrupts import Interrupted
    from library.training.samples import TrainingSampler
    from library.training.saving import SaveGroup, warn_if_caches_short, warn_if_disk_short
    from library.training.state import load_state, remove_state, save_state
    from library.training.validation import Validation

    args = plan.args
    world = distributed.init()
    if world.is_main and (args.cache_latents_to_disk or args.cache_text_encoder_outputs_to_disk):
        warn_if_caches_short(args, plan)
    t = build_training(plan, load_models(args))
    network, groups, built, schedule = t.network, t.groups, t.optimizer, t.schedule
    assembler, loader = t.assembler, t.loader
    trainable = list(t.grad_step.trainable)

    te_lr = args.text_encoder_lr[0] if args.text_encoder_lr else None
    metadata = run_metadata(args, plan.train_group, plan.val_group,
                            built.ss_optimizer, plan.net_kwargs,
                            plan.num_epochs, len(loader), te_lr, args.unet_lr)
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
    from library.lora.files import SAVE_DTYPES
    save_dtype = SAVE_DTYPES[args.save_precision]
    if world.is_main:
        warn_if_disk_short(args, plan, trainable, t.apply_step, save_dtype, sample.prompts)

    # Each save below is attempted in a SaveGroup (library.training.saving): a full disk fails
    # it with one message, and the other saves of that step are still tried before the stop.
    def save(filename, step, epoch, saves):
        path = os.path.join(args.output_dir, filename)
        distributed.check_replicas(world, trainable, step, log)
        if not world.is_main:
            return path
        if saves.attempt(path, lambda: network.save_weights(
                path, dtype=save_dtype, metadata=at_save(metadata, step, epoch, args.no_metadata))):
            log.event("save", path=path, step=step, epoch=epoch)
            return path
        return None

    def remove(filename):
        path = os.path.join(args.output_dir, filename)
        if world.is_main and os.path.exists(path):
            os.unlink(path)
            log.event("remove", path=path)

    def save_training_state(folder_name, epoch, saves):
        path = os.path.join(args.output_dir, folder_name)
        if not world.is_main:   # the ranks' weights were compared by the save just before
            return path
        if saves.attempt(path, lambda: save_state(path, trainable, t.apply_step, {
                "current_epoch": epoch, "current_step": global_step, "seed": args.seed,
                "data_position": loader.state_dict(), "max_train_steps": args.max_train_steps,
                "loss_sum": loss_sum, "loss_count": loss_count, "world_size": world.size,
                "dataset": dataset})):
            log.event("save_state", path=path, step=global_step, epoch=epoch)
            return path
        return None

    def remove_training_state(folder_name):
        path = os.path.join(args.output_dir, folder_name)
        if world.is_main and remove_state(path):
            log.event("remove", path=path)

    def save_due(number, epoch, file_name, state_name, to_remove, keep, keep_state):
        """A step or epoch save (`number`: the step or the epoch), its state folder with
        --save_state, and the older ones --save_last_n_* (_state) let go, as kohya (not when
        the new one failed: the older one is then the newest there is)."""
        saves = SaveGroup()
        stale = to_remove(args, number, keep)
        if save(file_name(args, number), global_step, epoch, saves) and stale:
            remove(file_name(args, stale))
        if args.save_state:
            stale = to_remove(args, number, keep_state or keep)
            if save_training_state(state_name(args, number), epoch, saves) and stale:
                remove_training_state(state_name(args, stale))
        saves.raise_if_failed(global_step)

    def save_interrupted(epoch):
        """After Ctrl-C / SIGTERM: this step's LoRA and, with --save_state, a state that
        --resume continues exactly; then the run ends with exit code 130."""
        saves = SaveGroup()
        lora = save(names.interrupted_name(args), global_step, epoch, saves)
        state = None
        if args.save_state or args.save_state_on_train_end:
            state = save_training_state(names.interrupted_state_name(args), epoch, saves)
        saves.raise_if_failed(global_step)
        then = (f" and the state {state}; continue with --resume {state}" if state else
                " (with --save_state it also saves a state folder that --resume continues)")
        raise Interrupted(f"stopped after step {global_step} of {args.max_train_steps}: saved "
                          f"{lora}{then}")

    start_epoch, global_step, loss_sum, loss_count = 1, 0, 0.0, 0
    dataset = dataset_record(plan.train_group)     # what a --resume of a state is checked against
    if plan.resume is not None:
        # before any step graph runs: compiled functions do not see later host-side writes
        record = load_state(args.resume, trainable, t.apply_step)
        global_step, loss_sum, loss_count = (record["current_step"], record["loss_sum"],
                                             record["loss_count"])
        loader.load_state_dict(record["data_position"])
        start_epoch = record["data_position"]["epoch"]
        log.resume_losses(global_step)
        log.event("resume", path=args.resume, step=global_step, epoch=start_epoch)
        logger.info(f"resumed from {args.resume}: step {global_step}, epoch {start_epoch}, "
                    f"batch {record['data_position']['batch']} of the epoch")

    logger.info(f"training: {plan.train_group.num_batches()} batches per epoch, "
                f"{plan.num_epochs} epochs, {args.max_train_steps} optimizer steps, "
                f"{len(trainable)} LoRA tensors in {len(groups)} groups, buckets "
                f"{plan.train_group.bucket_shapes()}")
    accumulation = ms.Tensor(float(args.gradient_accumulation_steps), ms.float32)
    scaling = LossScaleWatch(t.apply_step.loss_scaler, log)
    # after load_state: a compiled graph does not see host-side writes made after it first ran
    if args.pynative:
        grad_fn, apply_fn, compiles = t.grad_step, t.apply_step, CompileRecord(log, dynamic=False)
    else:
        grad_fn, apply_fn, compiles = step_graphs(plan, t, accumulation, log)
    apply_compiled = args.pynative or compiles.graphs > 0
    bar = tqdm(total=args.max_train_steps, initial=global_step, desc="steps", smoothing=0,
               dynamic_ncols=True, disable=not world.is_main)
    epoch = start_epoch - 1
    stop.start_training()
    try:
        if global_step == 0:
            sample(0, 0)   # --sample_at_first (a resumed run does not sample first, as kohya)
        for epoch in range(start_epoch, plan.num_epochs + 1):
            network.on_epoch_start()
            micro = 0
            epoch_losses = []       # this epoch's batch losses, for kohya's loss/epoch_average
            # the epoch's first step number (a resumed epoch has done some of its batches)
            position = loader.state_dict()
            done = position["batch"] // world.size if position["epoch"] == epoch else 0
            first_step = global_step - done // args.gradient_accumulation_steps
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
                        f"the loss became {loss} at step {global_step + 1} (epoch {epoch}); the "
                        f"batch's images: {paths}. Nothing was saved from this step: lower the "
                        "learning rate, or check these images")
                micro += 1
                loss_sum, loss_count = loss_sum + loss, loss_count + 1
                epoch_losses.append(loss)
                if micro % args.gradient_accumulation_steps:
                    continue
                lrs = schedule.lrs(scaling.schedule_step(global_step))
                t1 = time.time()
                grad_norm = float(apply_fn(ms.Tensor(lrs), accumulation).asnumpy())
                if not apply_compiled:      # its first call: the compile and one update
                    apply_compiled = True
                    compiles.add("apply_step", time.time() - t1)
                global_step += 1
                step_seconds = time.time() - t0
                scalars = {"loss/current": loss, "loss/average": loss_sum / loss_count,
                           "grad_norm": grad_norm, "seconds_per_step": step_seconds}
                scalars.update({f"lr/{g.description}": float(lr) for g, lr in zip(groups, lrs)})
                scalars.update(scaling.after_apply(global_step, epoch))
                scalars.update(validation.at_step(global_step, loss_sum / loss_count))
                log.step(global_step, scalars)
                bar.update(1)
                bar.set_postfix(epoch=epoch, avr_loss=f"{loss_sum / loss_count:.4f}",
                                lr=f"{float(lrs[0]):.2e}", s_step=f"{step_seconds:.2f}",
                                **validation.postfix)
                sample(global_step)
                # as kohya, also at the last step (the final file is written besides)
                if args.save_every_n_steps and global_step % args.save_every_n_steps == 0:
                    save_due(global_step, epoch, names.step_name, names.step_state_name,
                             names.step_to_remove, args.save_last_n_steps,
                             args.save_last_n_steps_state)
                if global_step >= args.max_train_steps:
                    break
                if stop.requested.is_set():
                    save_interrupted(epoch)
            if epoch_losses:
                log.epoch(epoch, {"loss/epoch_average": float(np.mean(epoch_losses))})
            validation.at_epoch(epoch, global_step, loss_sum / loss_count)
            if args.save_every_n_epochs and epoch % args.save_every_n_epochs == 0 \
                    and epoch < plan.num_epochs:
                save_due(epoch, epoch, names.epoch_name, names.epoch_state_name,
                         names.epoch_to_remove, args.save_last_n_epochs,
                         args.save_last_n_epochs_state)
            sample(global_step, epoch)
            if global_step >= args.max_train_steps:
                break
        saves = SaveGroup()
        if args.save_state or args.save_state_on_train_end:
            save_training_state(names.last_state_name(args), epoch, saves)
        final = save(names.last_name(args), global_step, epoch, saves)
        saves.raise_if_failed(global_step)
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
        log.event("end", steps=global_step, skipped_steps=scaling.skipped(), **compiles.totals())
        log.close()
    logger.info(f"saved {final} ({global_step} steps, {compiles.graphs} step graph(s) compiled, "
                f"{compiles.hits} from the compile cache)")
    return final


def _cast_frozen(models, weight_dtype, vae_dtype):
    import mindspore as ms
    for cell, dtype in ((models.unet, weight_dtype), (models.text_encoder1, weight_dtype),
                        (models.text_encoder2, weight_dtype), (models.vae, vae_dtype)):
        if dtype == ms.float32:
            continue
        for p in cell.get_parameters():
            p.set_dtype(dtype)
