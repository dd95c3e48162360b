"""`--network_module networks.lora`: kohya's networks/lora.py entry points for SDXL.

kohya's trainer and tools call a network module's create_network and
create_network_from_weights; this module has them, and merge_lora_weights. The network, its
cells, key names, key styles and files are the library/lora package (one job per file, see its
__init__); the names other tools use are re-exported here under kohya's module, as kohya has
them in one file. docs/lora.md has the usage and every deliberate difference from kohya.
"""

from library.errors import UserError
from library.lora.args import (NUM_TOTAL_BLOCKS, check_network_kwargs, get_block_lr_weight,
                               parse_float, parse_floats, parse_int, parse_ints)
from library.lora.files import SAVE_DTYPES, load_lora_file, save_lora_file
from library.lora.keys import convert_to_kohya_keys, split_modules
from library.lora.matching import match_report, raise_if_bad
from library.lora.modules import LoRAConv2d, LoRADense, LoRAModule, delta_weight
from library.lora.names import get_block_index
from library.lora.network import LoRANetwork
from library.lora.targets import model_targets

__all__ = ["create_network", "create_network_from_weights", "merge_lora_weights", "LoRANetwork",
           "LoRAModule", "LoRADense", "LoRAConv2d", "SAVE_DTYPES", "load_lora_file", "save_lora_file",
           "convert_to_kohya_keys", "split_modules", "match_report", "raise_if_bad", "model_targets",
           "delta_weight", "get_block_index"]


def create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet,
                   neuron_dropout=None, **kwargs):
    """kohya's create_network for SDXL. `text_encoder` is [text_encoder1, text_encoder2];
    kwargs are the --network_args (strings like kohya's, or numbers). Unknown keys are errors."""
    check_network_kwargs(kwargs)
    if network_dim is None:
        network_dim = 4
    if network_alpha is None:
        network_alpha = 1.0
    conv_dim = kwargs.get("conv_dim")
    conv_alpha = kwargs.get("conv_alpha")
    if conv_dim is not None:
        conv_dim = parse_int("conv_dim", conv_dim)
        conv_alpha = 1.0 if conv_alpha is None else parse_float("conv_alpha", conv_alpha)

    block_dims = kwargs.get("block_dims")
    block_lr_weight = get_block_lr_weight(
        kwargs.get("down_lr_weight"), kwargs.get("mid_lr_weight"), kwargs.get("up_lr_weight"),
        parse_float("block_lr_zero_threshold", kwargs.get("block_lr_zero_threshold", 0.0)))
    block_alphas = conv_block_dims = conv_block_alphas = None
    if block_dims is not None or block_lr_weight is not None:
        block_dims = (parse_ints("block_dims", block_dims) if block_dims is not None
                      else [network_dim] * NUM_TOTAL_BLOCKS)
        block_alphas = (parse_floats("block_alphas", kwargs["block_alphas"])
                        if kwargs.get("block_alphas") is not None
                        else [network_alpha] * NUM_TOTAL_BLOCKS)
        if kwargs.get("conv_block_dims") is not None:
            conv_block_dims = parse_ints("conv_block_dims", kwargs["conv_block_dims"])
            conv_block_alphas = (parse_floats("conv_block_alphas", kwargs["conv_block_alphas"])
                                 if kwargs.get("conv_block_alphas") is not None
                                 else [1.0 if conv_alpha is None else conv_alpha]
                                 * NUM_TOTAL_BLOCKS)
        elif conv_dim is not None:
            conv_block_dims = [conv_dim] * NUM_TOTAL_BLOCKS
            conv_block_alphas = [conv_alpha] * NUM_TOTAL_BLOCKS
        if block_lr_weight is not None:    # blocks without LR get no modules (kohya)
            for i, w in enumerate(block_lr_weight):
                if w == 0:
                    block_dims[i] = 0
                    if conv_block_dims is not None:
                        conv_block_dims[i] = 0
    else:
        for key in ("block_alphas", "conv_block_dims", "conv_block_alphas"):
            if kwargs.get(key) is not None:
                raise UserError(f"network_args {key} needs block_dims (or a *_lr_weight), as in "
                                "kohya, where it is otherwise ignored")

    rank_dropout = kwargs.get("rank_dropout")
    rank_dropout = None if rank_dropout is None else parse_float("rank_dropout", rank_dropout)
    module_dropout = kwargs.get("module_dropout")
    module_dropout = None if module_dropout is None else parse_float("module_dropout", module_dropout)
    for key, p in (("network_dropout", neuron_dropout), ("rank_dropout", rank_dropout),
                   ("module_dropout", module_dropout)):
        if p is not None and not 0 <= float(p) < 1:
            raise UserError(f"{key} must be in [0, 1), got {p}")

    network = LoRANetwork(text_encoder, unet, multiplier=multiplier, lora_dim=int(network_dim),
                          alpha=float(network_alpha), dropout=neuron_dropout,
                          rank_dropout=rank_dropout, module_dropout=module_dropout,
                          conv_lora_dim=conv_dim, conv_alpha=conv_alpha, block_dims=block_dims,
                          block_alphas=block_alphas, conv_block_dims=conv_block_dims,
                          conv_block_alphas=conv_block_alphas)
    ratios = [None if kwargs.get(k) is None else parse_float(k, kwargs[k]) for k in
              ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")]
    if any(r is not None for r in ratios):
        network.set_loraplus_lr_ratio(*ratios)
    if block_lr_weight is not None:
        network.set_block_lr_weight(block_lr_weight)
    return network


def create_network_from_weights(multiplier, file, vae, text_encoder, unet, weights_sd=None,
                                for_inference=False, **kwargs):
    """kohya's create_network_from_weights: a network with each module's rank and alpha taken
    from the file (diffusers/PEFT key styles converted). Returns (network, weights_sd in kohya
    names); the weights are not loaded (call network.load_state_dict or merge_to).

    Strict, unlike kohya: a key that fits no module of these models, or a wrong shape, is a
    UserError listing what did not fit."""
    check_network_kwargs(kwargs)
    usable = {"down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold",
              "loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"}
    unusable = sorted(set(kwargs) - usable)
    if unusable:     # kohya ignores them here; the ranks and alphas come from the file
        raise UserError(f"network_args {', '.join(unusable)} cannot be used when the network is "
                        "built from a weights file (--dim_from_weights): its ranks and alphas "
                        "come from the file")
    source = str(file) if file is not None else "LoRA weights"
    unet_cfg = getattr(unet, "cfg", None)
    if weights_sd is None:
        weights_sd, _ = load_lora_file(file, unet_config=unet_cfg)
    else:
        weights_sd = convert_to_kohya_keys(weights_sd, unet_config=unet_cfg)
    modules = split_modules(weights_sd)
    modules_dim = {n: e["lora_down"].shape[0] for n, e in modules.items() if "lora_down" in e}
    modules_alpha = {n: modules[n].get("alpha", modules_dim[n]) for n in modules_dim}
    network = LoRANetwork(text_encoder, unet, multiplier=multiplier, modules_dim=modules_dim,
                          modules_alpha=modules_alpha)
    network.check_weights(weights_sd, source)
    block_lr_weight = get_block_lr_weight(
        kwargs.get("down_lr_weight"), kwargs.get("mid_lr_weight"), kwargs.get("up_lr_weight"),
        parse_float("block_lr_zero_threshold", kwargs.get("block_lr_zero_threshold", 0.0)))
    if block_lr_weight is not None:
        network.set_block_lr_weight(block_lr_weight)
    ratios = [None if kwargs.get(k) is None else parse_float(k, kwargs[k]) for k in
              ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")]
    if any(r is not None for r in ratios):      # (kohya drops LoRA+ in this path)
        network.set_loraplus_lr_ratio(*ratios)
    return network, weights_sd


def merge_lora_weights(models, weights_list, multipliers):
    """Merge several LoRAs (each a file path or {key: array}) into `models` (an SDXLModels)
    with their multipliers; each is checked strictly before anything is changed."""
    text_encoders = [models.text_encoder1, models.text_encoder2]
    prepared = []
    for weights, m in zip(weights_list, multipliers):
        from_file = not isinstance(weights, dict)
        prepared.append((m,) + create_network_from_weights(
            m, str(weights) if from_file else None, None, text_encoders, models.unet,
            weights_sd=None if from_file else weights))
    for m, net, sd in prepared:
        net.merge_to(weights_sd=sd, multiplier=m)
