"""From kohya's --optimizer_type / --optimizer_args / --learning_rate to an optimizer Cell.

Supported: AdamW (default), Lion, SGDNesterov, Adafactor, Prodigy, with the keyword arguments
their PyTorch implementations accept and kohya forwards. kohya's bitsandbytes names (AdamW8bit,
PagedAdamW8bit, Lion8bit, ...) run the optimizer with the same update rule and 32-bit state, with
one warning line, and ss_optimizer says so (why: README, "8-bit optimizers"). Everything else
kohya accepts (D-Adaptation, schedule-free, AdEMAMix, arbitrary `module.Class`) is an error that
names the optimizer and lists the supported ones, as is an --optimizer_args key the chosen
optimizer does not take.
"""

from __future__ import annotations

import ast
import logging
from typing import TYPE_CHECKING, NamedTuple, Optional, Sequence

from library.errors import UserError

if TYPE_CHECKING:   # the optimizer Cells import MindSpore: not before the options are checked
    from library.training.optimizer_cells import GroupedOptimizer
    from library.lora.network import ParamGroup

logger = logging.getLogger(__name__)

_FLOAT, _BOOL, _PAIR, _OPTIONAL_FLOAT = "a number", "True or False", "a pair of numbers", "a number or None"

# name -> (class in library.training.optimizer_cells, accepted --optimizer_args with their kind,
#          kohya's optimizer class name for ss_optimizer)
_SPECS = {
    "adamw": ("AdamW", {"betas": _PAIR, "eps": _FLOAT, "weight_decay": _FLOAT},
              "torch.optim.adamw.AdamW"),
    "lion": ("Lion", {"betas": _PAIR, "weight_decay": _FLOAT, "decoupled_weight_decay": _BOOL},
             "lion_pytorch.lion_pytorch.Lion"),
    "sgdnesterov": ("SGDNesterov", {"momentum": _FLOAT, "weight_decay": _FLOAT},
                    "torch.optim.sgd.SGD"),
    "adafactor": ("Adafactor",
                  {"eps": _PAIR, "clip_threshold": _FLOAT, "decay_rate": _FLOAT, "beta1": _OPTIONAL_FLOAT,
                   "weight_decay": _FLOAT, "scale_parameter": _BOOL, "relative_step": _BOOL,
                   "warmup_init": _BOOL},
                  "transformers.optimization.Adafactor"),
    "prodigy": ("Prodigy",
                {"betas": _PAIR, "beta3": _OPTIONAL_FLOAT, "eps": _FLOAT, "weight_decay": _FLOAT,
                 "decouple": _BOOL, "use_bias_correction": _BOOL, "safeguard_warmup": _BOOL,
                 "d0": _FLOAT, "d_coef": _FLOAT, "growth_rate": _FLOAT},
                "prodigyopt.prodigy.Prodigy"),
}
SUPPORTED_OPTIMIZERS = ("AdamW", "Lion", "SGDNesterov", "Adafactor", "Prodigy")

# kohya's bitsandbytes optimizer names -> the optimizer with their update rule. The 8-bit ones
# quantise the moments block-wise; the paged ones page state out of GPU memory (CUDA unified
# memory). Neither changes the update rule, so these run with 32-bit state.
BITSANDBYTES = {"adamw8bit": "adamw", "pagedadamw8bit": "adamw", "pagedadamw": "adamw",
                "pagedadamw32bit": "adamw", "lion8bit": "lion", "pagedlion8bit": "lion",
                "sgdnesterov8bit": "sgdnesterov"}


class BuiltOptimizer(NamedTuple):
    optimizer: GroupedOptimizer
    lr_scheduler: str        # the schedule to use: the requested one, or "adafactor" (see below)
    kohya_name: str          # for ss_optimizer: kohya writes "<class>(<args>)"
    kohya_args: str          # "k=v,..." as kohya logs the final kwargs
    requested: str = ""      # a bitsandbytes name run as its 32-bit optimizer (BITSANDBYTES)

    @property
    def ss_optimizer(self):
        """kohya's "<class>(<args>)", plus what ran instead of a bitsandbytes optimizer."""
        text = f"{self.kohya_name}({self.kohya_args})"
        if self.requested:
            text += f" for --optimizer_type {self.requested}: 32-bit state, no bitsandbytes"
        return text


def parse_optimizer_args(items: Optional[Sequence[str]]):
    """`key=value` strings -> dict; values are Python literals (ast.literal_eval, as kohya)."""
    kwargs = {}
    for item in items or ():
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError(f"--optimizer_args {item!r}: expected key=value")
        try:
            kwargs[key.strip()] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            raise UserError(f"--optimizer_args {item!r}: {text!r} is not a Python literal "
                            f"(numbers, True/False, None, tuples like (0.9,0.99))") from None
    return kwargs


def _check_kind(name, key, value, kind):
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {
        _FLOAT: is_number,
        _BOOL: isinstance(value, bool),
        _PAIR: isinstance(value, (tuple, list)) and len(value) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value),
        _OPTIONAL_FLOAT: value is None or is_number,
    }[kind]
    if not ok:
        raise UserError(f"--optimizer_args {key}={value!r}: {name} needs {kind} for {key}")


def _optimizer_key(optimizer_type, use_8bit_adam, use_lion_optimizer):
    if use_8bit_adam:       # kohya's legacy spelling of AdamW8bit
        if optimizer_type or use_lion_optimizer:
            raise UserError("--use_8bit_adam cannot be combined with --optimizer_type or "
                            "--use_lion_optimizer (as in kohya)")
        optimizer_type = "AdamW8bit"
    if use_lion_optimizer:
        if optimizer_type:
            raise UserError("--use_lion_optimizer and --optimizer_type cannot both be given")
        return "lion"
    key = (optimizer_type or "AdamW").lower()
    key = BITSANDBYTES.get(key, key)
    if key not in _SPECS:
        raise UserError(f"--optimizer_type {optimizer_type} is not supported; supported optimizers: "
                        f"{', '.join(SUPPORTED_OPTIMIZERS)}")
    return key


def check_optimizer_options(optimizer_type="", optimizer_args=None, use_8bit_adam=False,
                            use_lion_optimizer=False):
    """The optimizer's key and its parsed --optimizer_args, or a UserError; needs no parameters,
    so the trainer can check these before loading any model."""
    key = _optimizer_key(optimizer_type, use_8bit_adam, use_lion_optimizer)
    name, accepted, _ = _SPECS[key]
    kwargs = parse_optimizer_args(optimizer_args)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise UserError(f"--optimizer_args {', '.join(unknown)}: not accepted by {name} "
                        f"(it takes {', '.join(accepted)})")
    for k, v in kwargs.items():
        _check_kind(name, k, v, accepted[k])
    return key, kwargs


def build_optimizer(groups: Sequence[ParamGroup], learning_rate: float, optimizer_type: str = "",
                    optimizer_args: Optional[Sequence[str]] = None, lr_scheduler: str = "constant",
                    use_8bit_adam: bool = False, use_lion_optimizer: bool = False) -> BuiltOptimizer:
    """The optimizer for `groups` (each group's own LR; --learning_rate is the default LR).

    Adafactor with relative_step=True (its default) computes its own step size, so kohya switches
    the LR schedule to "adafactor" (a constant that the optimizer ignores). kohya does this silently
    whatever --lr_scheduler says; here a requested schedule other than constant or adafactor is an
    error, because it would have no effect.
    """
    key, kwargs = check_optimizer_options(optimizer_type, optimizer_args, use_8bit_adam,
                                          use_lion_optimizer)
    from library.training import optimizer_cells
    name, _, kohya_name = _SPECS[key]
    cls = getattr(optimizer_cells, name)
    requested = "AdamW8bit" if use_8bit_adam else optimizer_type
    if requested.lower() not in BITSANDBYTES:
        requested = ""
    else:
        logger.warning(f"--optimizer_type {requested}: running {name} with the same update "
                       f"rule and 32-bit state (bitsandbytes is CUDA-only; see the README, "
                       f"\"8-bit optimizers\"); ss_optimizer records it")

    extra = {}
    if key == "sgdnesterov":
        kwargs.setdefault("momentum", 0.9)  # kohya: Nesterov needs momentum, 0.9 if not given
    elif key == "lion":
        extra["learning_rate"] = learning_rate
    elif key == "adafactor":
        kwargs.setdefault("relative_step", True)
        if kwargs.get("warmup_init") and not kwargs["relative_step"]:
            logger.info("Adafactor: warmup_init=True needs relative_step, setting relative_step=True (as kohya)")
            kwargs["relative_step"] = True
        if kwargs["relative_step"]:
            if lr_scheduler not in ("constant", "adafactor"):
                raise UserError(f"--lr_scheduler {lr_scheduler} has no effect with Adafactor's "
                                f"relative_step=True (its default): use --lr_scheduler adafactor, or "
                                f"--optimizer_args relative_step=False scale_parameter=False")
            lr_scheduler = "adafactor"
            if learning_rate != 0.0 or len({g.lr for g in groups}) > 1:
                logger.warning("Adafactor relative_step=True ignores --learning_rate and per-group LRs")
    elif key == "prodigy" and max(g.lr for g in groups) <= 0.1:
        logger.warning(f"Prodigy's LR scales its estimated step size; around 1.0 is recommended "
                       f"(got {max(g.lr for g in groups)})")

    try:
        optimizer = cls(groups, **extra, **kwargs)
    except ValueError as e:  # the optimizers' own checks of their arguments
        raise UserError(f"--optimizer_type {name}: {e}") from None
    kohya_args = ",".join(f"{k}={v}" for k, v in kwargs.items())
    return BuiltOptimizer(optimizer, lr_scheduler, kohya_name, kohya_args, requested)
