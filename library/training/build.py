"""What a run is built from, once the models are loaded: the frozen models in their dtypes, the
caches, the LoRA, the optimizer and LR schedule, and the two step Cells (not compiled yet).

    models = load_models(args)
    training = build_training(plan, models)     # a Training

The dtype policy is kohya's: --mixed_precision sets the frozen weights' dtype, --full_fp16 /
--full_bf16 the LoRA's too, --no_half_vae keeps the VAE in float32.
"""

import logging
import time
from dataclasses import dataclass

from library.errors import UserError
from library.training.batches import BatchAssembler

logger = logging.getLogger("sdxl_train_network")


@dataclass
class Training:
    """Everything a run steps through, built from a Plan and loaded models."""
    models: object
    network: object
    groups: list
    optimizer: object          # library.training.optimizer_options.BuiltOptimizer
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
    from library.training.loss_scale_policy import make_loss_scaler
    from library.training.noise_draws import NoiseSampler, ddpm_schedule
    from library.training.forward_diffusion import ForwardDiffusion
    from library.training.optimizer_options import build_optimizer
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


def _weight_dtypes(args):
    import mindspore as ms
    weight = {"no": ms.float32, "fp16": ms.float16, "bf16": ms.bfloat16}[args.mixed_precision]
    lora = weight if (args.full_fp16 or args.full_bf16) else ms.float32
    vae = ms.float32 if args.no_half_vae else weight
    return weight, lora, vae


def _cast_frozen(models, weight_dtype, vae_dtype):
    import mindspore as ms
    for cell, dtype in ((models.unet, weight_dtype), (models.text_encoder1, weight_dtype),
                        (models.text_encoder2, weight_dtype), (models.vae, vae_dtype)):
        if dtype == ms.float32:
            continue
        for p in cell.get_parameters():
            p.set_dtype(dtype)


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
