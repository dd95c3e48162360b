"""kohya's --network_args for networks.lora: the keys it takes, their parsing and ranges, and the
per-block LR weights. No MindSpore here, so the trainer and generator check a user's arguments
before MindSpore is imported (its import alone takes about 2 s).
"""

import math

from library.errors import UserError

# kohya: 1 (time/label embedding) + 9 input blocks + 3 middle + 9 output + 1 (out) = 23 slots.
SDXL_NUM_OF_BLOCKS = 9
SDXL_NUM_OF_MID_BLOCKS = 3
NUM_TOTAL_BLOCKS = 1 + SDXL_NUM_OF_BLOCKS * 2 + SDXL_NUM_OF_MID_BLOCKS + 1

def parse_int(key, value):
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UserError(f"network_args {key}={value!r}: expected an integer") from None


def parse_float(key, value):
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UserError(f"network_args {key}={value!r}: expected a number") from None


def parse_ints(key, value, count=NUM_TOTAL_BLOCKS):
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    values = [parse_int(key, v) for v in items]
    if len(values) != count:
        raise UserError(f"network_args {key} must have {count} comma-separated values (one per "
                        f"SDXL block: 1 embedding + 9 input + 3 middle + 9 output + 1 out), "
                        f"got {len(values)}")
    return values


def parse_floats(key, value, count=NUM_TOTAL_BLOCKS):
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    values = [parse_float(key, v) for v in items]
    if len(values) != count:
        raise UserError(f"network_args {key} must have {count} comma-separated values (one per "
                        f"SDXL block), got {len(values)}")
    return values


NETWORK_ARGS = {
    "conv_dim": "rank of the 3x3 convs (enables ResBlock/Downsample/Upsample targets)",
    "conv_alpha": "alpha of the 3x3 convs (default 1.0)",
    "rank_dropout": "probability of dropping each rank per sample (training only)",
    "module_dropout": "probability of skipping a whole module per call (training only)",
    "block_dims": "23 comma-separated ranks, one per SDXL block",
    "block_alphas": "23 comma-separated alphas",
    "conv_block_dims": "23 comma-separated 3x3-conv ranks",
    "conv_block_alphas": "23 comma-separated 3x3-conv alphas",
    "down_lr_weight": "9 LR weights for input_blocks 0-8, or a preset "
                      "(cosine, sine, linear, reverse_linear, zeros, optionally +base)",
    "mid_lr_weight": "3 LR weights for middle_block 0-2",
    "up_lr_weight": "9 LR weights for output_blocks 0-8, or a preset",
    "block_lr_zero_threshold": "block LR weights at or below this remove the block's modules",
    "loraplus_lr_ratio": "LoRA+: lora_up parameters get lr x ratio",
    "loraplus_unet_lr_ratio": "LoRA+ ratio for the UNet (overrides loraplus_lr_ratio)",
    "loraplus_text_encoder_lr_ratio": "LoRA+ ratio for the text encoders",
}


def parse_network_args(items):
    """`--network_args key=value ...` -> {key: value string}, split on the first '=' as kohya.

    Unlike kohya, an unknown key is an error (kohya ignores it silently)."""
    kwargs = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"network_args {item!r} is not key=value (e.g. \"conv_dim=4\")")
        key, value = item.split("=", 1)
        kwargs[key.strip()] = value.strip()
    check_network_kwargs(kwargs)
    return kwargs


# The numbers among NETWORK_ARGS, checked at parse time (create_network converts them again as
# it builds, after the model load): one parser per key, and the values' range.
_NUMBER_ARGS = {
    "conv_dim": (parse_int, 0, None), "conv_alpha": (parse_float, 0, None),
    "rank_dropout": (parse_float, 0, 1), "module_dropout": (parse_float, 0, 1),
    "block_dims": (parse_ints, 0, None), "conv_block_dims": (parse_ints, 0, None),
    "block_alphas": (parse_floats, 0, None), "conv_block_alphas": (parse_floats, 0, None),
    "block_lr_zero_threshold": (parse_float, 0, None), "loraplus_lr_ratio": (parse_float, 0, None),
    "loraplus_unet_lr_ratio": (parse_float, 0, None), "loraplus_text_encoder_lr_ratio": (parse_float, 0, None),
}


def check_network_kwargs(kwargs):
    unknown = sorted(k for k in kwargs if k not in NETWORK_ARGS)
    if unknown:
        hint = (" (neuron dropout is --network_dropout)" if "dropout" in unknown else "")
        raise UserError(f"unknown network_args for networks.lora: {', '.join(unknown)}{hint}; "
                        f"valid keys: {', '.join(NETWORK_ARGS)}")
    for key, (parse, low, high) in _NUMBER_ARGS.items():
        if kwargs.get(key) is None:
            continue
        values = parse(key, kwargs[key])
        for v in values if isinstance(values, list) else [values]:
            if not (math.isfinite(v) and v >= low and (high is None or v < high)):
                bound = f"in [{low}, {high})" if high is not None else f"{low} or more"
                raise UserError(f"network_args {key}={kwargs[key]!r}: each value must be {bound}")


def _lr_weight_preset(key, spec):
    tokens = spec.split("+")
    name = tokens[0]
    base = parse_float(key, tokens[1]) if len(tokens) > 1 else 0.0
    n = SDXL_NUM_OF_BLOCKS
    presets = {
        "cosine": [math.sin(math.pi * (i / (n - 1)) / 2) + base for i in reversed(range(n))],
        "sine": [math.sin(math.pi * (i / (n - 1)) / 2) + base for i in range(n)],
        "linear": [i / (n - 1) + base for i in range(n)],
        "reverse_linear": [i / (n - 1) + base for i in reversed(range(n))],
        "zeros": [0.0 + base] * n,
    }
    if name not in presets:
        raise UserError(f"network_args {key}={spec!r}: not a comma-separated list nor a preset "
                        f"({', '.join(presets)}, optionally followed by +base)")
    return presets[name]


def _lr_weight_list(key, value):
    if isinstance(value, (list, tuple)):
        return [float(v) for v in value]
    value = str(value)
    if "," in value:                       # kohya: empty items are 0.0
        return [parse_float(key, s) if s else 0.0 for s in value.split(",")]
    return None


def get_block_lr_weight(down_lr_weight=None, mid_lr_weight=None, up_lr_weight=None,
                        zero_threshold=0.0):
    """kohya's parse_block_lr_kwargs + get_block_lr_weight for SDXL: the 23 per-block LR
    weights, or None when no *_lr_weight is given. Short lists are padded with 1.0, long ones
    truncated (with kohya's warnings); weights <= zero_threshold become 0."""
    if down_lr_weight is None and mid_lr_weight is None and up_lr_weight is None:
        return None
    n, n_mid = SDXL_NUM_OF_BLOCKS, SDXL_NUM_OF_MID_BLOCKS

    def side(key, value):
        if value is None:
            return None
        values = _lr_weight_list(key, value)
        if values is None:
            values = _lr_weight_preset(key, str(value)) if not _is_number(value) \
                else [parse_float(key, value)]
        return values

    down = side("down_lr_weight", down_lr_weight)
    up = side("up_lr_weight", up_lr_weight)
    mid = None
    if mid_lr_weight is not None:
        mid = (list(map(float, mid_lr_weight)) if isinstance(mid_lr_weight, (list, tuple))
               else [parse_float("mid_lr_weight", s) if s else 0.0
                     for s in str(mid_lr_weight).split(",")])

    def fit(values, length):
        if values is None:
            return [1.0] * length
        values = values[:length] + [1.0] * max(0, length - len(values))
        return [w if w > zero_threshold else 0 for w in values]

    return [1.0] + fit(down, n) + fit(mid, n_mid) + fit(up, n) + [1.0]


def _is_number(value):
    try:
        float(value)
        return True
    except (TypeError, ValueError):
        return False
