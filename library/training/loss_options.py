"""The host side of kohya's training loss: its options, checked at parse time, and the
per-timestep tables the compiled loss gathers from (see library/training/losses.py). No MindSpore
here, so option errors surface before its import."""

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from library.errors import UserError
from library.training.noise_draws import DDPMSchedule, NUM_TRAIN_TIMESTEPS

LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")

# kohya clamps the SNR to 1000 in these weights: "if timestep is 0, snr_t is inf"
_SNR_CLAMP = 1000.0


@dataclass(frozen=True)
class LossOptions:
    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    masked: bool = False  # --masked_loss, or any sample carries an alpha mask
    min_snr_gamma: Optional[float] = None
    v_parameterization: bool = False
    scale_v_pred_loss_like_noise_pred: bool = False
    v_pred_like_loss: Optional[float] = None
    debiased_estimation_loss: bool = False

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise UserError(f"--loss_type {self.loss_type!r}: choose one of {', '.join(LOSS_TYPES)}")
        if self.huber_schedule not in HUBER_SCHEDULES:
            raise UserError(f"--huber_schedule {self.huber_schedule!r}: choose one of "
                            f"{', '.join(HUBER_SCHEDULES)}")
        if self.uses_huber_c and self.huber_schedule == "exponential" and self.huber_c <= 0:
            raise UserError("--huber_schedule exponential needs --huber_c > 0 (it takes log(huber_c))")
        if self.scale_v_pred_loss_like_noise_pred and not self.v_parameterization:
            raise UserError("--scale_v_pred_loss_like_noise_pred needs --v_parameterization")
        if self.v_pred_like_loss and self.v_parameterization:
            raise UserError("--v_pred_like_loss cannot be used with --v_parameterization")

    @property
    def uses_huber_c(self):
        return self.loss_type in ("huber", "smooth_l1")


def huber_c_per_timestep(options: LossOptions, schedule: DDPMSchedule):
    """kohya's `get_huber_threshold_if_needed` for every t (train_util.py:6110-6130)."""
    t = np.arange(NUM_TRAIN_TIMESTEPS, dtype=np.float64)
    c, scale = options.huber_c, options.huber_scale
    if options.huber_schedule == "exponential":
        alpha = -math.log(c) / NUM_TRAIN_TIMESTEPS
        table = np.exp(-alpha * t) * scale
    elif options.huber_schedule == "snr":  # huber_scale is not used by this schedule (as kohya)
        ac = schedule.alphas_cumprod.astype(np.float64)
        sigmas = np.sqrt((1.0 - ac) / ac)
        table = (1 - c) / (1 + sigmas) ** 2 + c
    else:
        table = np.full(NUM_TRAIN_TIMESTEPS, c * scale)
    return table.astype(np.float32)


def timestep_weights(options: LossOptions, schedule: DDPMSchedule):
    """The product of kohya's post-mean loss weights for every t (custom_train_functions.py:68-108)."""
    snr = schedule.snr.astype(np.float64)
    clamped = np.minimum(snr, _SNR_CLAMP)
    noise_pred_scale = clamped / (clamped + 1)  # kohya's get_snr_scale
    w = np.ones_like(snr)
    if options.min_snr_gamma:
        w *= np.minimum(snr, options.min_snr_gamma) / (snr + 1 if options.v_parameterization else snr)
    if options.scale_v_pred_loss_like_noise_pred:
        w *= noise_pred_scale
    if options.v_pred_like_loss:
        w *= 1 + options.v_pred_like_loss / noise_pred_scale
    if options.debiased_estimation_loss:
        w *= 1 / (clamped + 1) if options.v_parameterization else 1 / np.sqrt(clamped)
    return w.astype(np.float32)
