"""The trainer's plan: every check that needs no model, then the dataset and the step counts.

    plan = prepare(args)     # a Plan; bad options, paths and dataset entries fail here

Host code only: MindSpore is not imported (it takes about 2 s), so a bad option or path fails in
a fraction of a second (tests/test_faults.py::test_bad_options_fail_before_mindspore_is_imported).
"""

import logging
import math
import os
import random
from dataclasses import dataclass

from library.errors import UserError

logger = logging.getLogger("sdxl_train_network")


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


def check_contradictions(args):
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
    from library.training.noise_draws import NoiseOptions
    from library.training.optimizer_options import check_optimizer_options
    from library.training.samples import check_sample_options
    from library.training.schedules import LRScheduleOptions
    from library.training.validation import check_validation_options
    from library.data.loader import batches_per_rank
    from library.training.world import world_from_env
    from library.lora.args import parse_network_args

    world = world_from_env(os.environ)     # msrun's ranks (one process without msrun)
    check_contradictions(args)
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
