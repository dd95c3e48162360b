"""Number checks for command-line options, shared by the trainer, the generator and the merge
tool: a value out of range is one error naming the option, before any model is loaded (else a
negative learning rate trains backwards, a NaN scale makes black images, and a negative seed or
a rank of 0 fails deep inside numpy or MindSpore).

    check_numbers(args, TRAINER_RANGES)
"""

import math
import os

from library.errors import UserError

SEED_MAX = 2 ** 32 - 1      # numpy's seeding range, which kohya's set_seed has too

# (option, lowest, highest[, "above": the lowest itself is out]): None is open. Values may be
# lists (--text_encoder_lr).
TRAINER_RANGES = (
    ("learning_rate", 0, None), ("unet_lr", 0, None), ("text_encoder_lr", 0, None),
    ("max_train_epochs", 1, None), ("network_dim", 1, None), ("network_alpha", 0, None),
    ("network_dropout", 0, 1), ("seed", 0, SEED_MAX), ("max_grad_norm", 0, None),
    # 0 is "off" in kohya's GUIs' configs; a negative count is a typo
    ("save_every_n_steps", 0, None), ("save_every_n_epochs", 0, None),
    ("save_last_n_steps", 0, None), ("save_last_n_epochs", 0, None),
    ("save_last_n_steps_state", 0, None), ("save_last_n_epochs_state", 0, None),
    ("lr_warmup_steps", 0, None), ("lr_decay_steps", 0, None),
    ("lr_scheduler_min_lr_ratio", 0, 1), ("max_data_loader_n_workers", 0, None),
    ("lr_scheduler_power", 0, None),    # a negative power makes the polynomial LR infinite
    # a negative gamma or discount turns the weighting or the noise inside out; a Huber c of 0
    # makes the loss 0, so nothing would train
    ("min_snr_gamma", 0, None), ("multires_noise_discount", 0, 1),
    ("huber_c", 0, None, "above"), ("huber_scale", 0, None, "above"),
)
MERGE_RANGES = (("new_rank", 1, None), ("new_conv_rank", 1, None))
GENERATOR_RANGES = (
    ("seed", 0, SEED_MAX), ("vae_batch_size", 0, None, "above"),
    ("max_embeddings_multiples", 1, None), ("highres_fix_strength", 0, 1),
    ("network_merge_n_models", 0, None), ("original_width", 1, None), ("original_height", 1, None),
    ("original_width_negative", 1, None), ("original_height_negative", 1, None),
    ("crop_top", 0, None), ("crop_left", 0, None),
)


def _bounds(low, high, above):
    if above:
        return f"must be above {low}"
    if high is None:
        return f"must be {low} or more"
    return f"must be between {low} and {high}"


def check_numbers(args, ranges):
    """Raise UserError for a NaN or infinite float option (never meaningful, whichever option)
    or a value outside its range in `ranges`."""
    for dest, value in vars(args).items():
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, float) and not math.isfinite(v):
                raise UserError(f"--{dest} {v}: must be a finite number")
    for dest, low, high, *above in ranges:
        value = getattr(args, dest, None)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is None:
                continue
            if v < low or (above and v == low) or (high is not None and v > high):
                extra = " (leave --seed out for a random one)" if dest == "seed" else ""
                raise UserError(f"--{dest} {v}: {_bounds(low, high, above)}{extra}")


def check_folder_can_be_made(path, option):
    """`path` is a folder or can be made as one (its nearest existing parent is a writable
    folder): checked before the model load, so an image or a log is not made and then lost."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UserError(f"{option} {path}: {probe} is a file, not a folder; choose another path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{option} {path}: the folder {probe} is not writable")
