"""The training-run `ss_*` keys kohya writes into every saved LoRA (train_network.py:1003-1221).

The network, model-name and modelspec keys come from library/lora_metadata.py and the dataset keys
from library/data/dataset_metadata.py; this module adds the run's own: learning rates, loop, noise and
loss settings, precision, the optimizer, and the per-save fields (steps, epoch, finish time).
Values are `str()`-ed as kohya does, so `None` is written as "None".
"""

import random
import time

from library.data.dataset_metadata import dataset_metadata
from library.lora_metadata import lora_metadata_from_args, minimum_metadata, stringify


def run_metadata(args, train_group, val_group, optimizer_name, net_kwargs, num_epochs,
                 num_batches_per_epoch, text_encoder_lr, unet_lr):
    started = time.time()
    md = {
        "ss_session_id": random.randint(0, 2 ** 32),
        "ss_training_started_at": started,
        "ss_output_name": args.output_name,
        "ss_learning_rate": args.learning_rate,
        "ss_text_encoder_lr": text_encoder_lr,
        "ss_unet_lr": unet_lr,
        "ss_num_epochs": num_epochs,
        "ss_gradient_checkpointing": args.gradient_checkpointing,
        "ss_gradient_accumulation_steps": args.gradient_accumulation_steps,
        "ss_max_train_steps": args.max_train_steps,
        "ss_lr_warmup_steps": args.lr_warmup_steps,
        "ss_lr_scheduler": args.lr_scheduler,
        "ss_mixed_precision": args.mixed_precision,
        "ss_full_fp16": bool(args.full_fp16),
        "ss_clip_skip": args.clip_skip,
        "ss_max_token_length": args.max_token_length,
        "ss_cache_latents": bool(args.cache_latents),
        "ss_seed": args.seed,
        "ss_lowram": False,
        "ss_noise_offset": args.noise_offset,
        "ss_multires_noise_iterations": args.multires_noise_iterations,
        "ss_multires_noise_discount": args.multires_noise_discount,
        "ss_adaptive_noise_scale": args.adaptive_noise_scale,
        "ss_zero_terminal_snr": False,
        "ss_training_comment": args.training_comment,
        "ss_sd_scripts_commit_hash": "",   # not sd-scripts; see modelspec.implementation_version
        "ss_optimizer": optimizer_name,
        "ss_max_grad_norm": args.max_grad_norm,
        "ss_caption_dropout_rate": args.caption_dropout_rate,
        "ss_caption_dropout_every_n_epochs": args.caption_dropout_every_n_epochs,
        "ss_caption_tag_dropout_rate": args.caption_tag_dropout_rate,
        "ss_face_crop_aug_range": None,
        "ss_prior_loss_weight": args.prior_loss_weight,
        "ss_min_snr_gamma": args.min_snr_gamma,
        "ss_scale_weight_norms": None,
        "ss_ip_noise_gamma": args.ip_noise_gamma,
        "ss_debiased_estimation": bool(args.debiased_estimation_loss),
        "ss_noise_offset_random_strength": args.noise_offset_random_strength,
        "ss_ip_noise_gamma_random_strength": args.ip_noise_gamma_random_strength,
        "ss_loss_type": args.loss_type,
        "ss_huber_schedule": args.huber_schedule,
        "ss_huber_scale": args.huber_scale,
        "ss_huber_c": args.huber_c,
        "ss_fp8_base": False,
        "ss_fp8_base_unet": False,
        "ss_validation_seed": args.validation_seed,
        "ss_validation_split": args.validation_split,
        "ss_max_validation_steps": args.max_validation_steps,
        "ss_validate_every_n_epochs": args.validate_every_n_epochs,
        "ss_validate_every_n_steps": args.validate_every_n_steps,
        "ss_resize_interpolation": args.resize_interpolation,
    }
    md.update(dataset_metadata(train_group, val_group, args,
                               total_batch_size=args.train_batch_size * args.gradient_accumulation_steps,
                               num_batches_per_epoch=num_batches_per_epoch))
    md = stringify(md)
    md.update(lora_metadata_from_args(args, net_kwargs, timestamp=started))
    if args.no_metadata:
        md = {k: v for k, v in md.items() if not k.startswith("ss_")}
        md.update(minimum_metadata(lora_metadata_from_args(args, net_kwargs, timestamp=started)))
    return md


def at_save(metadata, steps, epoch, no_metadata=False):
    """The fields kohya refreshes at each save."""
    md = dict(metadata)
    if not no_metadata:
        md.update(stringify({"ss_training_finished_at": time.time(), "ss_steps": steps,
                             "ss_epoch": epoch}))
    return md
