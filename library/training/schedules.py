"""Learning-rate schedules as plain functions of the optimizer step (no MindSpore, no state).

kohya builds transformers' LambdaLR schedules (train_util.get_scheduler_fix); each is a multiplier
of every parameter group's base LR. `LRSchedule.multiplier(step)` gives the multiplier for the
optimizer step about to run (step 0 is the first: LambdaLR evaluates its lambda at 0 before any
`scheduler.step()`), so the LR of group g at step s is `base_lr[g] * multiplier(s)`.

Contract with the compiled train step: the loop computes `LRSchedule.lrs(step)` on the host and
passes it to the step as a float32 tensor input of shape (num_groups,). A new LR therefore never
triggers a recompile, and the optimizer Cells read the LR only from that input.

Like kohya under accelerate, the schedule runs over `max_train_steps * num_processes` steps and
advances `num_processes` times per optimizer step (accelerate's AcceleratedScheduler steps once per
process); warm-up and decay fractions are fractions of that number.
"""

import argparse
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np

from library.errors import UserError

SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
              "polynomial", "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay", "adafactor")
# transformers' polynomial schedule decays to this absolute LR (kohya does not change it)
POLYNOMIAL_LR_END = 1e-7


class _NotAStepCount(UserError, argparse.ArgumentTypeError):
    """Also an ArgumentTypeError, so that argparse names the option it was given to."""


def int_or_float(value: str):
    """kohya's parser type for --lr_warmup_steps / --lr_decay_steps: "10" -> 10 steps,
    "0.1" or "10%" -> a fraction of the training steps; "1.0" and other floats >= 1 are errors."""
    text = str(value).strip()
    try:
        if text.endswith("%"):
            return float(text[:-1]) / 100.0
        number = float(text)
        return int(text) if number >= 1 else number
    except ValueError:
        raise _NotAStepCount(f"{value!r} is neither a step count (an integer) nor a fraction "
                        f"(a number below 1, or a percentage like 10%)") from None


@dataclass(frozen=True)
class LRScheduleOptions:
    lr_scheduler: str = "constant"
    lr_warmup_steps: Union[int, float] = 0
    lr_decay_steps: Union[int, float] = 0
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0
    lr_scheduler_timescale: Optional[int] = None
    lr_scheduler_min_lr_ratio: Optional[float] = None

    def __post_init__(self):
        if self.lr_scheduler not in SCHEDULERS:
            raise UserError(f"--lr_scheduler {self.lr_scheduler!r} is not supported; choose one of "
                            f"{', '.join(SCHEDULERS)}")
        if self.lr_scheduler in ("constant", "adafactor") and self.lr_warmup_steps:
            raise UserError(f"--lr_scheduler {self.lr_scheduler} does not use --lr_warmup_steps; "
                            f"set it to 0 or use constant_with_warmup")
        if self.lr_scheduler == "cosine_with_min_lr" and self.lr_scheduler_min_lr_ratio is None:
            raise UserError("--lr_scheduler cosine_with_min_lr needs --lr_scheduler_min_lr_ratio")


def _fraction_or_steps(value, total):
    return int(value * total) if isinstance(value, float) else int(value)


def _warmup(step, warmup):
    return step / max(1, warmup)


class LRSchedule:
    """`multiplier(step)` and `lrs(step)` for one run (see the module docstring)."""

    def __init__(self, options: LRScheduleOptions, base_lrs: Sequence[float], max_train_steps: int,
                 learning_rate: float, num_processes: int = 1):
        """`base_lrs`: each parameter group's LR; `learning_rate`: --learning_rate, the
        optimizer's default LR (the polynomial schedule is relative to it, as in transformers)."""
        self.options = options
        self.base_lrs = np.asarray(base_lrs, dtype=np.float32)
        self.num_processes = num_processes
        self.total = max_train_steps * num_processes
        self.warmup = _fraction_or_steps(options.lr_warmup_steps, self.total)
        self.decay = _fraction_or_steps(options.lr_decay_steps, self.total)
        self.learning_rate = learning_rate
        if options.lr_scheduler == "polynomial" and not learning_rate > POLYNOMIAL_LR_END:
            raise UserError(f"--lr_scheduler polynomial decays to {POLYNOMIAL_LR_END}: "
                            f"--learning_rate must be larger (got {learning_rate})")

    def lrs(self, step):
        """Each group's LR for optimizer step `step` (0-based), float32 (num_groups,)."""
        return self.base_lrs * np.float32(self.multiplier(step))

    def multiplier(self, step):
        s = step * self.num_processes
        o, warmup, total = self.options, self.warmup, self.total
        name = o.lr_scheduler
        if name in ("constant", "adafactor"):
            # relative-step Adafactor computes its own step size and ignores the LR input
            return 1.0
        if name == "warmup_stable_decay":
            return self._warmup_stable_decay(s)
        if s < warmup:
            return _warmup(s, warmup)
        progress = (s - warmup) / max(1, total - warmup)
        if name == "constant_with_warmup":
            return 1.0
        if name == "linear":
            return max(0.0, (total - s) / max(1, total - warmup))
        if name == "cosine":  # transformers' default num_cycles=0.5: one half cosine
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))
        if name == "cosine_with_restarts":
            if progress >= 1.0:
                return 0.0
            cycles = o.lr_scheduler_num_cycles
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((cycles * progress) % 1.0))))
        if name == "cosine_with_min_lr":  # kohya passes num_cycles / 2
            ratio = o.lr_scheduler_min_lr_ratio
            factor = 0.5 * (1.0 + math.cos(math.pi * (o.lr_scheduler_num_cycles / 2) * 2.0 * progress))
            return max(0.0, factor * (1 - ratio) + ratio)
        if name == "polynomial":
            lr_init = self.learning_rate
            if s > total:
                return POLYNOMIAL_LR_END / lr_init
            remaining = 1 - (s - warmup) / (total - warmup)
            decay = (lr_init - POLYNOMIAL_LR_END) * remaining ** o.lr_scheduler_power + POLYNOMIAL_LR_END
            return decay / lr_init
        # inverse_sqrt
        timescale = o.lr_scheduler_timescale or warmup or 10_000
        return 1.0 / math.sqrt((s + timescale - warmup) / timescale)

    def _warmup_stable_decay(self, s):
        """transformers' WSD with its defaults (linear warm-up, cosine decay) and kohya's
        num_cycles / 2 and min_lr_ratio (0 when unset)."""
        o, warmup, decay = self.options, self.warmup, self.decay
        ratio = o.lr_scheduler_min_lr_ratio or 0.0
        stable = self.total - warmup - decay
        if s < warmup:
            return max(0.0, _warmup(s, warmup) * (1.0 - ratio) + ratio)
        if s < warmup + stable:
            return 1.0
        if s < warmup + stable + decay:
            progress = (s - warmup - stable) / max(1, decay)
            factor = 0.5 * (1.0 + math.cos(math.pi * (o.lr_scheduler_num_cycles / 2) * 2.0 * progress))
            return max(0.0, factor * (1.0 - ratio) + ratio)
        return ratio
