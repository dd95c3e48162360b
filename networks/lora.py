"""LoRA for the SDXL UNet and both text encoders, with kohya-ss/sd-scripts' file format.

`--network_module networks.lora` here is kohya's `networks/lora.py` for SDXL: the same targets,
key names, initialisation, scale (alpha / rank), dropouts, `--network_args` and parameter
groups, so a LoRA trained here loads in kohya, ComfyUI, A1111/Forge and diffusers, and theirs
load here. See docs/lora.md for usage and every deliberate difference.

How it attaches (MindSpore's graph mode cannot patch a cell's forward as kohya does): the
targeted `nn.Dense` / `nn.Conv2d` cells are replaced *in place* by a host cell
(`LoRADense` / `LoRAConv2d`) that keeps the original `weight` / `bias` Parameters under their
original names (checkpoint I/O is unaffected) and holds a list of LoRA branches
(`lora_branches.<i>`), one per applied network. A branch (`LoRAModule`) owns `lora_down`,
`lora_up` and shares its network's `multiplier` Parameter, so the multiplier can be changed
between calls of a compiled graph without recompiling. Branch parameters are named with their
kohya keys (`lora_unet_..._to_q.lora_down.weight`), unique across the three models.

The network object (`LoRANetwork`) is a plain Python object, not a Cell: its branches live
inside the models' cell trees, and it keeps the list of them.
"""

import math
from typing import NamedTuple, Sequence

import numpy as np
import mindspore as ms
from mindspore import nn, ops, Parameter, Tensor
from mindspore.common.initializer import HeUniform, initializer

from library import layers
from library.errors import UserError
from library.file_checks import refuse_non_finite, refuse_pickle
from library.models.unet import SpatialTransformer
from library.safetensors_io import SafetensorsFile, write_safetensors
from networks.lora_args import (NUM_TOTAL_BLOCKS, check_network_kwargs, get_block_lr_weight,
                                parse_float, parse_floats, parse_int, parse_ints)

UNET_PREFIX = "lora_unet"
TE_PREFIXES = ("lora_te1", "lora_te2")
SD1_TE_PREFIX = "lora_te"

# Our classes for kohya's class-name target lists (lora.py:862-875):
#   Transformer2DModel -> SpatialTransformer; ResnetBlock2D -> ResBlock;
#   Downsample2D / Upsample2D -> Downsample / Upsample; CLIPAttention, CLIPMLP -> same names.
UNET_TARGET_CLASSES = ("SpatialTransformer",)
UNET_TARGET_CLASSES_CONV2D_3X3 = ("ResBlock", "Downsample", "Upsample")
TEXT_ENCODER_TARGET_CLASSES = ("CLIPAttention", "CLIPMLP")

SAVE_DTYPES = {None: None, "float": "float32", "float32": "float32", "fp32": "float32",
               "fp16": "float16", "float16": "float16", "bf16": "bfloat16",
               "bfloat16": "bfloat16"}


class ParamGroup(NamedTuple):
    """One optimizer group: its Parameters, learning rate and a name for logs (kohya's
    prepare_optimizer_params returns these; library/training/optimizers.py takes them)."""
    params: Sequence
    lr: float
    description: str


# =============================================================================================
# Cells
# =============================================================================================

class LoRAModule(nn.Cell):
    """One LoRA branch: `delta(x) = lora_up(lora_down(x)) * multiplier * alpha / rank`.

    kohya's LoRAModule without the original forward (the host cell adds the base output).
    Dropouts act only in training mode, as kohya's: neuron dropout on the rank activations,
    rank dropout (a per-sample mask over the rank, rescaled by 1/(1-p)), module dropout (the
    whole branch skipped for a call with probability p).
    """

    def __init__(self, lora_name, org, lora_dim, alpha, multiplier, dropout=None,
                 rank_dropout=None, module_dropout=None, dtype=ms.float32):
        super().__init__()
        self.lora_name = lora_name
        self.lora_dim = int(lora_dim)
        self.is_conv = _is_conv(org)
        if isinstance(alpha, (np.ndarray, Tensor)):
            alpha = float(np.asarray(alpha.asnumpy() if isinstance(alpha, Tensor) else alpha))
        alpha = self.lora_dim if alpha is None or alpha == 0 else float(alpha)
        self.alpha = float(alpha)
        self.scale = self.alpha / self.lora_dim
        if self.is_conv:
            in_dim, out_dim = org.in_channels, org.out_channels
            self.lora_down = nn.Conv2d(in_dim, self.lora_dim, org.kernel_size, stride=org.stride,
                                       pad_mode=org.pad_mode, padding=org.padding,
                                       has_bias=False, weight_init="zeros", dtype=dtype)
            self.lora_up = nn.Conv2d(self.lora_dim, out_dim, 1, has_bias=False,
                                     weight_init="zeros", dtype=dtype)
            fan_in = in_dim * org.kernel_size[0] * org.kernel_size[1]
        else:
            in_dim, out_dim = org.in_channels, org.out_channels
            self.lora_down = layers.Linear(in_dim, self.lora_dim, bias=False, weight_init="zeros",
                                           dtype=dtype)
            self.lora_up = layers.Linear(self.lora_dim, out_dim, bias=False, weight_init="zeros",
                                         dtype=dtype)
            fan_in = in_dim
        self.in_dim, self.out_dim, self.fan_in = in_dim, out_dim, fan_in
        # kohya (= Microsoft's LoRA): kaiming_uniform_(down, a=sqrt(5)), zeros_(up).
        self.lora_down.weight.set_data(
            initializer(HeUniform(math.sqrt(5)), self.lora_down.weight.shape, dtype))
        self.multiplier = multiplier
        self.dropout = None if dropout is None else float(dropout)
        self.rank_dropout = None if rank_dropout is None else float(rank_dropout)
        self.module_dropout = None if module_dropout is None else float(module_dropout)

    def construct(self, x):
        dtype = self.lora_down.weight.dtype
        lx = self.lora_down(x.astype(dtype))
        scale = self.scale
        if self.training and self.dropout is not None:
            lx = ops.dropout(lx, p=self.dropout, training=True)
        if self.training and self.rank_dropout is not None:
            keep = (ops.rand((lx.shape[0], self.lora_dim)) > self.rank_dropout).astype(dtype)
            if lx.ndim == 3:
                keep = keep[:, None, :]
            elif lx.ndim == 4:
                keep = keep[:, :, None, None]
            lx = lx * keep
            scale = scale / (1.0 - self.rank_dropout)
        # the scale on the rank-r activations, not on the (tokens x out) output: a far
        # smaller multiply forward and backward
        out = self.lora_up(lx * (self.multiplier.astype(dtype) * scale))
        if self.training and self.module_dropout is not None:
            out = out * (ops.rand((1,)) >= self.module_dropout).astype(dtype)
        return out

    # -- numpy views (float32) --
    def down_up(self):
        return (self.lora_down.weight.astype(ms.float32).asnumpy(),
                self.lora_up.weight.astype(ms.float32).asnumpy())

    def delta_weight(self, down=None, up=None):
        """ΔW = (alpha/rank)·up@down in the original weight's layout (float32, no multiplier)."""
        if down is None:
            down, up = self.down_up()
        return delta_weight(down, up, self.scale)


class LoRADense(nn.Cell):
    """Drop-in replacement for a targeted `nn.Dense`: the same `weight`/`bias` Parameters and
    forward, plus the sum of its LoRA branches."""

    def __init__(self, org):
        super().__init__()
        self.in_channels, self.out_channels = org.in_channels, org.out_channels
        self.has_bias = org.has_bias
        self.weight = org.weight
        self.bias = org.bias if self.has_bias else None
        self.lora_branches = nn.CellList()

    def construct(self, x):
        return _with_branches(layers.linear(x, self.weight, self.bias), x, self.lora_branches)


class LoRAConv2d(nn.Cell):
    """Drop-in replacement for a targeted `nn.Conv2d` (same primitive, weight and bias)."""

    def __init__(self, org):
        super().__init__()
        self.in_channels, self.out_channels = org.in_channels, org.out_channels
        self.kernel_size, self.stride = org.kernel_size, org.stride
        self.pad_mode, self.padding = org.pad_mode, org.padding
        self.has_bias = org.has_bias
        self.weight = org.weight
        if self.has_bias:
            self.bias = org.bias
        self.conv2d = org.conv2d
        self.bias_add = ops.BiasAdd()
        self.lora_branches = nn.CellList()

    def construct(self, x):
        y = self.conv2d(x, self.weight)
        if self.has_bias:
            y = self.bias_add(y, self.bias)
        return _with_branches(y, x, self.lora_branches)


def _with_branches(y, x, branches):
    """The host's output plus each LoRA branch's, as one same-shape sum (`layers.add`)."""
    outs = [y]
    for branch in branches:
        outs.append(branch(x).astype(y.dtype))
    return layers.add(*outs)


def _keep_sample_axis(unets):
    """Rank dropout masks per sample over (B, L, r) activations (kohya): the UNets' transformers
    then keep (B, L, C) tokens instead of token rows (SpatialTransformer)."""
    for unet in unets:
        for _, cell in unet.cells_and_names():
            if isinstance(cell, SpatialTransformer):
                cell.token_rows = False


_HOSTS = (LoRADense, LoRAConv2d)


def _is_conv(cell):
    return isinstance(cell, (nn.Conv2d, LoRAConv2d))


def _is_linear(cell):
    return isinstance(cell, (nn.Dense, LoRADense))


def is_lora_parameter_name(name):
    """True for the parameters LoRA adds to a model (`...lora_branches.0.lora_down.weight`):
    checkpoint I/O of the base model skips them."""
    return any(part.startswith("lora_") for part in name.split("."))


def delta_weight(down, up, scale):
    """(alpha/rank)·up@down reshaped to the original weight: Linear [out,in]; conv [out,in,k,k]
    (the 1×1 up kernel folds into the down kernel, exact for any kernel size)."""
    down = np.asarray(down, dtype=np.float32)
    up = np.asarray(up, dtype=np.float32)
    out_dim, rank = up.shape[0], up.shape[1]
    flat = up.reshape(out_dim, rank) @ down.reshape(rank, -1)
    return (flat * np.float32(scale)).reshape((out_dim,) + down.shape[1:])


# =============================================================================================
# Module tree: targets and names
# =============================================================================================

def _walk(cell, path=""):
    """(path, cell) for `cell` and its descendants, not descending into LoRA hosts."""
    yield path, cell
    if isinstance(cell, _HOSTS):
        return
    for name, child in cell.name_cells().items():
        yield from _walk(child, f"{path}.{name}" if path else name)


def _target_children(root, target_classes):
    """(module path, child path, child) for each Dense/Conv2d inside a target-class cell, in
    tree order (kohya's create_modules loop)."""
    for path, cell in _walk(root):
        if type(cell).__name__ not in target_classes:
            continue
        for child_path, child in _walk(cell):
            if child_path and (_is_linear(child) or _is_conv(child)):
                yield path, child_path, child


def lora_name_for(prefix, module_path, child_path):
    return f"{prefix}.{module_path}.{child_path}".replace(".", "_")


def get_block_index(lora_name):
    """kohya's SDXL block index (0..22) of a UNet LoRA name; -1 for anything else."""
    if not lora_name.startswith(UNET_PREFIX + "_"):
        return -1
    name = lora_name[len(UNET_PREFIX) + 1:]
    if name.startswith(("time_embed_", "label_emb_")):
        return 0
    if name.startswith("input_blocks_"):
        return 1 + int(name.split("_")[2])
    if name.startswith("middle_block_"):
        return 10 + int(name.split("_")[2])
    if name.startswith("output_blocks_"):
        return 13 + int(name.split("_")[2])
    if name.startswith("out_"):
        return 22
    return -1


def _resolve(root, path):
    """(parent cell, key) of the cell at `path` under `root`."""
    parts = path.split(".")
    parent = root
    for part in parts[:-1]:
        parent = parent.name_cells()[part]
    return parent, parts[-1]


def _replace(parent, key, new):
    if isinstance(parent, (nn.SequentialCell, nn.CellList)):
        parent[int(key)] = new
    else:
        setattr(parent, key, new)


# =============================================================================================
# The network
# =============================================================================================

class _ParameterSetter(nn.Cell):
    """Writes a Parameter from inside a compiled graph. In PyNative mode, MindSpore 2.7.1 does not
    show a host-side `Parameter.set_data` to a function already compiled with `ms.jit`; an
    assign in a graph is seen by every graph (tests/test_lora_network.py checks it)."""

    def __init__(self, param):
        super().__init__(auto_prefix=False)
        self.param = param

    def construct(self, value):
        ops.assign(self.param, value)
        return self.param


class LoRANetwork:
    """kohya's LoRANetwork for SDXL (the same constructor patterns):
    1. lora_dim + alpha; 2. + conv_lora_dim/conv_alpha; 3. block_dims/block_alphas;
    4. + conv_block_dims/conv_block_alphas; 5. modules_dim/modules_alpha (from a file).
    """

    def __init__(self, text_encoders, unet, multiplier=1.0, lora_dim=4, alpha=1,
                 dropout=None, rank_dropout=None, module_dropout=None, conv_lora_dim=None,
                 conv_alpha=None, block_dims=None, block_alphas=None, conv_block_dims=None,
                 conv_block_alphas=None, modules_dim=None, modules_alpha=None,
                 dtype=ms.float32):
        text_encoders = _text_encoder_list(text_encoders)
        self.lora_dim, self.alpha = lora_dim, alpha
        self.conv_lora_dim, self.conv_alpha = conv_lora_dim, conv_alpha
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout
        self.loraplus_lr_ratio = None
        self.loraplus_unet_lr_ratio = None
        self.loraplus_text_encoder_lr_ratio = None
        self.block_lr_weight = None
        self._multiplier_value = float(multiplier)
        self._enabled = True
        self.multiplier = Parameter(Tensor(float(multiplier), ms.float32),
                                    name="lora_multiplier", requires_grad=False)
        self._multiplier_setter = None    # built on first use (see _ParameterSetter)
        self.skipped = []
        self.applied = False
        self._places = {}

        def create_modules(prefix, root, target_classes, is_unet):
            loras = []
            for module_path, child_path, child in _target_children(root, target_classes):
                name = lora_name_for(prefix, module_path, child_path)
                is_conv = _is_conv(child)
                is_linear_like = not is_conv or tuple(child.kernel_size) == (1, 1)
                dim = alpha_ = None
                if modules_dim is not None:
                    if name in modules_dim:
                        dim, alpha_ = modules_dim[name], modules_alpha[name]
                elif is_unet and block_dims is not None:
                    idx = get_block_index(name)
                    if is_linear_like:
                        dim, alpha_ = block_dims[idx], block_alphas[idx]
                    elif conv_block_dims is not None:
                        dim, alpha_ = conv_block_dims[idx], conv_block_alphas[idx]
                elif is_linear_like:
                    dim, alpha_ = lora_dim, alpha
                elif conv_lora_dim is not None:
                    dim, alpha_ = conv_lora_dim, conv_alpha
                if not dim:
                    if is_linear_like or conv_lora_dim is not None or conv_block_dims is not None:
                        self.skipped.append(name)
                    continue
                lora = LoRAModule(name, child, dim, alpha_, self.multiplier, dropout=dropout,
                                  rank_dropout=rank_dropout, module_dropout=module_dropout,
                                  dtype=dtype)
                # Where the original cell is (not a Cell attribute: that would make the model
                # a child of the branch, a cycle in the cell tree).
                self._places[name] = (root, f"{module_path}.{child_path}")
                loras.append(lora)
            return loras

        self.text_encoder_loras = []
        for prefix, te in zip(TE_PREFIXES, text_encoders):
            self.text_encoder_loras += create_modules(prefix, te, TEXT_ENCODER_TARGET_CLASSES,
                                                      False)
        targets = UNET_TARGET_CLASSES
        # kohya adds the conv classes to a copy here (its `+=` mutates the class list: a bug).
        if modules_dim is not None or conv_lora_dim is not None or conv_block_dims is not None:
            targets = targets + UNET_TARGET_CLASSES_CONV2D_3X3
        self.unet_loras = create_modules(UNET_PREFIX, unet, targets, True) if unet is not None \
            else []
        names = [lora.lora_name for lora in self.loras]
        assert len(names) == len(set(names)), "duplicated LoRA names"

    # -- basics ----------------------------------------------------------------------------

    @property
    def loras(self):
        return self.text_encoder_loras + self.unet_loras

    def __len__(self):
        return len(self.loras)

    def _parent_of(self, lora):
        root, path = self._places[lora.lora_name]
        return _resolve(root, path)

    def target_cell(self, lora):
        """The cell a module targets (the host once applied, else the original)."""
        parent, key = self._parent_of(lora)
        return parent.name_cells()[key]

    def module_names(self):
        return [lora.lora_name for lora in self.loras]

    def set_multiplier(self, multiplier):
        """Change the strength of the unmerged LoRA; a compiled graph sees it at its next call."""
        self._multiplier_value = float(multiplier)
        self._write_multiplier()

    def set_enabled(self, enabled):
        self._enabled = bool(enabled)
        self._write_multiplier()

    def _write_multiplier(self):
        value = self._multiplier_value if self._enabled else 0.0
        if self._multiplier_setter is None:
            self._multiplier_setter = ms.jit(_ParameterSetter(self.multiplier).construct)
        self._multiplier_setter(Tensor(value, ms.float32))

    def get_multiplier(self):
        return self._multiplier_value

    def is_mergeable(self):
        return True

    def enable_gradient_checkpointing(self):
        pass    # as kohya: the models' own checkpointing covers the LoRA branches

    def prepare_grad_etc(self, text_encoder=None, unet=None):
        for p in self.get_trainable_params():
            p.requires_grad = True

    def on_epoch_start(self, text_encoder=None, unet=None):
        for lora in self.loras:
            lora.set_train(True)

    def get_trainable_params(self):
        return [p for lora in self.loras for p in (lora.lora_down.weight, lora.lora_up.weight)]

    # -- attaching -------------------------------------------------------------------------

    def apply_to(self, text_encoders=None, unet=None, apply_text_encoder=True, apply_unet=True):
        """Insert the branches into the models (in place). A side not applied is dropped from
        the network and not saved, as kohya."""
        if not apply_text_encoder:
            self.text_encoder_loras = []
        if not apply_unet:
            self.unet_loras = []
        hosts = []
        for lora in self.loras:
            parent, key = self._parent_of(lora)
            cell = parent.name_cells()[key]
            if not isinstance(cell, _HOSTS):
                names = {"weight": cell.weight.name}
                if cell.has_bias:
                    names["bias"] = cell.bias.name
                host = LoRAConv2d(cell) if _is_conv(cell) else LoRADense(cell)
                host.set_train(parent.training)
                _replace(parent, key, host)
                host.weight.name = names["weight"]
                if host.has_bias:
                    host.bias.name = names["bias"]
                cell = host
            hosts.append(cell)
        # A second network on the same models gets a name prefix, so names stay unique.
        index = max((len(h.lora_branches) for h in hosts), default=0)
        prefix = "" if index == 0 else f"net{index}."
        for lora, host in zip(self.loras, hosts):
            lora.set_train(host.training)
            host.lora_branches.append(lora)
        for lora in self.loras:
            lora.lora_down.weight.name = f"{prefix}{lora.lora_name}.lora_down.weight"
            lora.lora_up.weight.name = f"{prefix}{lora.lora_name}.lora_up.weight"
        self.multiplier.name = f"{prefix}lora_multiplier"
        if self.rank_dropout is not None:
            _keep_sample_axis(self._models_of(self.unet_loras))
        for model in self._models_of(self.loras):    # the branches are cells of their hosts now
            layers.check_parameter_names_once(model)
        self.applied = True

    def _models_of(self, loras):
        """The models (UNet, text encoders) these LoRA modules sit in, each once."""
        return list({id(m): m for m in (self._places[lora.lora_name][0] for lora in loras)}.values())

    # -- weights ---------------------------------------------------------------------------

    def key_shapes(self):
        """{file key: shape} of what save_weights writes, without touching any data."""
        shapes = {}
        for lora in self.loras:
            shapes[f"{lora.lora_name}.alpha"] = ()
            shapes[f"{lora.lora_name}.lora_down.weight"] = tuple(lora.lora_down.weight.shape)
            shapes[f"{lora.lora_name}.lora_up.weight"] = tuple(lora.lora_up.weight.shape)
        return shapes

    def state_dict(self):
        """{kohya key: float32 numpy array}; alpha is a float32 0-d array."""
        sd = {}
        for lora in self.loras:
            down, up = lora.down_up()
            sd[f"{lora.lora_name}.alpha"] = np.array(lora.alpha, dtype=np.float32)
            sd[f"{lora.lora_name}.lora_down.weight"] = down
            sd[f"{lora.lora_name}.lora_up.weight"] = up
        return sd

    def check_weights(self, weights_sd, source="LoRA weights", allow_missing=True):
        """Raise UserError if `weights_sd` (kohya names) does not fit this network exactly."""
        report = match_report(weights_sd, self)
        if not allow_missing and report["missing_modules"]:
            report["problems"].append(
                f"{len(report['missing_modules'])} modules of the network are not in the file: "
                f"{_listing(report['missing_modules'])}")
        raise_if_bad(report, source)

    def load_state_dict(self, weights_sd, strict=True, source="LoRA weights"):
        """Load {kohya key: array}. Strict (the default): every key must fit a module of this
        network with the right shape, and every module must be in the file (kohya loads with
        strict=False and silently ignores what does not fit)."""
        self.check_weights(weights_sd, source, allow_missing=not strict)
        modules = {lora.lora_name: lora for lora in self.loras}
        for name, entry in split_modules(weights_sd).items():
            lora = modules[name]
            for part in ("lora_down", "lora_up"):
                param = getattr(lora, part).weight
                param.set_data(Tensor(np.asarray(entry[part], dtype=np.float32), param.dtype))
            alpha = entry.get("alpha")
            alpha = float(np.asarray(alpha, dtype=np.float64)) if alpha is not None \
                else lora.lora_dim
            lora.alpha = alpha
            lora.scale = alpha / lora.lora_dim
        return {"loaded": len(split_modules(weights_sd)), "missing": [
            n for n in modules if n not in split_modules(weights_sd)]}

    def load_weights(self, file, strict=True):
        weights_sd, _ = load_lora_file(file, unet_config=_unet_config(self))
        return self.load_state_dict(weights_sd, strict=strict, source=str(file))

    def save_weights(self, file, dtype=None, metadata=None):
        """Write kohya's format atomically: `<name>.lora_down.weight`, `.lora_up.weight` and
        `.alpha` (float32 scalar) per module, in `dtype` (None/"float"/"fp16"/"bf16"), with
        `metadata` plus `sshs_model_hash` / `sshs_legacy_hash` computed as kohya does."""
        save_lora_file(file, self.state_dict(), dtype, metadata)

    # -- merging ---------------------------------------------------------------------------

    def merge_to(self, text_encoders=None, unet=None, weights_sd=None, dtype=None,
                 multiplier=None):
        """Add multiplier·ΔW of every module into the base weights (kohya's merge_to; computed in
        float32, stored back in each weight's dtype). With `weights_sd` the file's tensors are
        used, else the network's own. Sides without keys in `weights_sd` are skipped, as kohya.
        """
        m = self._multiplier_value if multiplier is None else float(multiplier)
        entries = split_modules(weights_sd) if weights_sd is not None else None
        for lora in self.loras:
            if entries is not None:
                if lora.lora_name not in entries:
                    continue
                e = entries[lora.lora_name]
                alpha = e.get("alpha")
                scale = (float(np.asarray(alpha, dtype=np.float64)) if alpha is not None
                         else lora.lora_dim) / lora.lora_dim
                delta = delta_weight(e["lora_down"], e["lora_up"], scale)
            else:
                delta = lora.delta_weight()
            add_to_weight(self.target_cell(lora).weight, m * delta)

    # -- optimizer -------------------------------------------------------------------------

    def set_loraplus_lr_ratio(self, loraplus_lr_ratio, loraplus_unet_lr_ratio,
                              loraplus_text_encoder_lr_ratio):
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.loraplus_unet_lr_ratio = loraplus_unet_lr_ratio
        self.loraplus_text_encoder_lr_ratio = loraplus_text_encoder_lr_ratio

    def set_block_lr_weight(self, block_lr_weight):
        self.block_lr_weight = block_lr_weight

    def get_lr_weight(self, block_idx):
        return 1.0 if self.block_lr_weight is None else self.block_lr_weight[block_idx]

    def param_groups(self, text_encoder_lr=None, unet_lr=None, default_lr=None):
        """Optimizer groups as a list of ParamGroup(params, lr, description), kohya's
        prepare_optimizer_params: text encoders first, then the UNet (one group, or one per
        block with block LR weights), each split into a "plus" group (lora_up, lr x ratio) with
        LoRA+; groups whose lr is 0 or None are left out ("NO LR skipping!").

        `text_encoder_lr` is None, one value (both text encoders, as kohya), or two values
        [TE1, TE2] (our addition; kohya's SDXL LoRA takes only the first).
        """
        groups = []

        def assemble(loras, lr, ratio, desc):
            plain, plus = [], []
            for lora in loras:
                plain.append(lora.lora_down.weight)
                (plus if ratio is not None else plain).append(lora.lora_up.weight)
            for params, group_lr, suffix in ((plain, lr, ""),
                                             (plus, None if lr is None or ratio is None
                                              else lr * ratio, " plus")):
                if params and group_lr:
                    groups.append(ParamGroup(params, group_lr, desc + suffix))

        te_ratio = self.loraplus_text_encoder_lr_ratio or self.loraplus_lr_ratio
        if self.text_encoder_loras:
            if isinstance(text_encoder_lr, (list, tuple)) and len(text_encoder_lr) > 2:
                raise UserError(f"text_encoder_lr takes one value (both text encoders) or two "
                                f"(TE1 TE2), got {len(text_encoder_lr)}")
            if isinstance(text_encoder_lr, (list, tuple)) and len(text_encoder_lr) == 2:
                for i, (prefix, lr) in enumerate(zip(TE_PREFIXES, text_encoder_lr)):
                    loras = [x for x in self.text_encoder_loras
                             if x.lora_name.startswith(prefix + "_")]
                    assemble(loras, default_lr if lr is None else lr, te_ratio,
                             f"textencoder {i + 1}")
            else:
                if isinstance(text_encoder_lr, (list, tuple)):
                    text_encoder_lr = text_encoder_lr[0] if text_encoder_lr else None
                assemble(self.text_encoder_loras,
                         default_lr if text_encoder_lr is None else text_encoder_lr, te_ratio,
                         "textencoder")
        if self.unet_loras:
            base = default_lr if unet_lr is None else unet_lr
            ratio = self.loraplus_unet_lr_ratio or self.loraplus_lr_ratio
            if self.block_lr_weight is not None:
                by_block = {}
                for lora in self.unet_loras:
                    by_block.setdefault(get_block_index(lora.lora_name), []).append(lora)
                for idx, loras in by_block.items():
                    lr = None if base is None else base * self.get_lr_weight(idx)
                    assemble(loras, lr, ratio, f"unet_block{idx}")
            else:
                assemble(self.unet_loras, base, ratio, "unet")
        return groups

    def prepare_optimizer_params(self, text_encoder_lr=None, unet_lr=None, default_lr=None):
        """kohya's return shape: ([{"params": [...], "lr": lr}, ...], [description, ...])."""
        groups = self.param_groups(text_encoder_lr, unet_lr, default_lr)
        return ([{"params": g.params, "lr": g.lr} for g in groups],
                [g.description for g in groups])

    def apply_max_norm_regularization(self, max_norm_value):
        """kohya's --scale_weight_norms: rescale modules whose ‖ΔW‖ exceeds max_norm (both
        factors by √ratio). Returns (keys_scaled, mean_norm, max_norm)."""
        keys_scaled, norms = 0, []
        for lora in self.loras:
            down, up = lora.down_up()
            norm = float(np.linalg.norm(delta_weight(down, up, lora.scale)))
            clamped = max(norm, max_norm_value / 2)
            desired = min(clamped, max_norm_value)
            ratio = desired / clamped
            sqrt_ratio = ratio ** 0.5
            if ratio != 1:
                keys_scaled += 1
                for param, arr in ((lora.lora_down.weight, down), (lora.lora_up.weight, up)):
                    param.set_data(Tensor(arr * sqrt_ratio, param.dtype))
            norms.append(norm * ratio)
        if not norms:
            return 0, 0.0, 0.0
        return keys_scaled, sum(norms) / len(norms), max(norms)


def _text_encoder_list(text_encoders):
    if text_encoders is None:
        return []
    if isinstance(text_encoders, (list, tuple)):
        if len(text_encoders) not in (0, 2):
            raise ValueError("SDXL LoRA needs both text encoders: [text_encoder1, text_encoder2]")
        return list(text_encoders)
    raise ValueError("pass the SDXL text encoders as a list [text_encoder1, text_encoder2]")


def _unet_config(network):
    for lora in network.unet_loras:
        return getattr(network._places[lora.lora_name][0], "cfg", None)
    return None


def add_to_weight(param, delta):
    """param += delta (float32 arithmetic, stored back in the parameter's dtype)."""
    base = param.astype(ms.float32).asnumpy()
    param.set_data(Tensor(base + delta.reshape(base.shape), param.dtype))


# =============================================================================================
# kohya's module-level API
# =============================================================================================

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


# =============================================================================================
# Files: reading, key styles, checking, writing
# =============================================================================================

_MAX_LISTED = 12


def _listing(items):
    items = sorted(items)
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f" ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


def load_lora_file(path, unet_config=None):
    """Read a LoRA .safetensors into ({kohya key: float32 array}, metadata). Diffusers-named
    kohya keys and PEFT/diffusers-format keys are converted to kohya's SGM names."""
    refuse_pickle(path)
    st = SafetensorsFile(path)
    sd = {k: np.asarray(st.get(k)) for k in st.keys()}
    if not sd:
        raise UserError(f"{path} holds no tensors: it is not a LoRA")
    refuse_non_finite(path, sd)
    return convert_to_kohya_keys(sd, st.metadata, unet_config), st.metadata



# --- key styles ---

_SUFFIXES = [  # (suffix, role) — every spelling of the two factors and alpha we convert
    (".lora_down.weight", "lora_down"), (".lora_up.weight", "lora_up"), (".alpha", "alpha"),
    (".lora_A.weight", "lora_down"), (".lora_B.weight", "lora_up"),
    (".lora_A.default.weight", "lora_down"), (".lora_B.default.weight", "lora_up"),
    (".lora.down.weight", "lora_down"), (".lora.up.weight", "lora_up"),
    ("_lora.down.weight", "lora_down"), ("_lora.up.weight", "lora_up"),
    (".lora_linear_layer.down.weight", "lora_down"), (".lora_linear_layer.up.weight", "lora_up"),
]
_PEFT_PREFIXES = {"unet.": UNET_PREFIX, "text_encoder.": "lora_te1",
                  "text_encoder_2.": "lora_te2"}
_ROLE_SUFFIX = {"lora_down": ".lora_down.weight", "lora_up": ".lora_up.weight",
                "alpha": ".alpha"}


def _diffusers_unet_pairs(unet_config):
    """[(diffusers prefix, SGM prefix)] in dotted form, longest first."""
    from library.models import keymaps
    from library.models.config import SDXL_BASE
    cfg = unet_config or SDXL_BASE.unet
    pairs = []
    for sgm, hf in keymaps.unet_block_prefixes(cfg):
        if ".resnets." in hf:
            for sgm_in, hf_in in (("in_layers.2.", "conv1."), ("out_layers.3.", "conv2."),
                                  ("emb_layers.1.", "time_emb_proj."),
                                  ("skip_connection.", "conv_shortcut."),
                                  ("in_layers.0.", "norm1."), ("out_layers.0.", "norm2.")):
                pairs.append((hf + hf_in, sgm + sgm_in))
        pairs.append((hf, sgm))
    return sorted(pairs, key=lambda p: -len(p[0]))


def _diffusers_to_sgm_dotted(path, pairs):
    path = path.replace(".processor.", ".").replace(".to_out_lora", ".to_out.0")
    for hf, sgm in pairs:
        if (path + ".").startswith(hf):
            return (sgm + (path + ".")[len(hf):])[:-1]
    return path


def _diffusers_to_sgm_underscored(name, pairs):
    """`down_blocks_1_attentions_0_...` -> `input_blocks_4_1_...` (kohya's
    convert_diffusers_to_sai_if_needed, on kohya-style names)."""
    for hf, sgm in pairs:
        hf_u, sgm_u = hf.replace(".", "_"), sgm.replace(".", "_")
        if (name + "_").startswith(hf_u):
            return (sgm_u + (name + "_")[len(hf_u):])[:-1]
    return name


def _adapter_alphas(metadata):
    """alpha per PEFT prefix from diffusers' `lora_adapter_metadata` (its LoraConfig dicts)."""
    import json
    raw = (metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        conf = json.loads(raw)
    except ValueError:
        return {}
    out = {}
    for prefix in ("unet", "text_encoder", "text_encoder_2"):
        alpha = conf.get(f"{prefix}.lora_alpha")
        if alpha is not None:
            out[prefix + "."] = float(alpha)
    return out


def convert_to_kohya_keys(sd, metadata=None, unet_config=None):
    """Rename every key to kohya's SGM form (`lora_unet_input_blocks_4_1_..._to_q.lora_down.
    weight`).
    Keys it does not recognise are kept as they are (the strict check reports them)."""
    pairs = _diffusers_unet_pairs(unet_config)
    alphas = _adapter_alphas(metadata)
    out = {}
    for key, value in sd.items():
        new = key
        if key.startswith((UNET_PREFIX + "_", "lora_te1_", "lora_te2_")) and "." in key:
            module, rest = key.split(".", 1)
            if module.startswith(UNET_PREFIX + "_") and ("down_blocks" in module or
                                                         "up_blocks" in module or
                                                         "mid_block" in module):
                module = UNET_PREFIX + "_" + _diffusers_to_sgm_underscored(
                    module[len(UNET_PREFIX) + 1:], pairs)
            new = f"{module}.{rest}"
        else:
            prefix = next((p for p in _PEFT_PREFIXES if key.startswith(p)), None)
            suffix = next(((s, r) for s, r in _SUFFIXES if key.endswith(s)), None)
            if prefix is not None and suffix is not None:
                path = key[len(prefix):-len(suffix[0])]
                if prefix == "unet.":
                    path = _diffusers_to_sgm_dotted(path, pairs)
                elif path.startswith("encoder."):
                    # transformers 5 dropped CLIPTextModel's `text_model.` level, so diffusers
                    # 0.42 saves `text_encoder.encoder.layers.N...`; diffusers reads both
                    path = "text_model." + path
                new = f"{_PEFT_PREFIXES[prefix]}_{path.replace('.', '_')}" \
                      f"{_ROLE_SUFFIX[suffix[1]]}"
                if suffix[1] == "lora_down" and prefix in alphas:
                    out.setdefault(new.rsplit(".", 2)[0] + ".alpha",
                                   np.array(alphas[prefix], dtype=np.float32))
        if new in out and not new.endswith(".alpha"):
            raise UserError(f"LoRA key {key!r} and another key both mean {new!r}")
        out[new] = value
    return out


def split_modules(sd):
    """{module name: {"lora_down": arr, "lora_up": arr, "alpha": arr}} from kohya keys; keys of
    any other form are left out (match_report lists them)."""
    modules = {}
    for key, value in sd.items():
        for role, suffix in _ROLE_SUFFIX.items():
            if key.endswith(suffix) and key[:-len(suffix)] and "." not in key[:-len(suffix)]:
                modules.setdefault(key[:-len(suffix)], {})[role] = value
                break
    return modules


def _family_hint(sd):
    """A guess at the model family of a LoRA that does not fit SDXL, for the error message."""
    keys = list(sd)
    if any(k.startswith(SD1_TE_PREFIX + "_") for k in keys):
        return ("it has lora_te_* keys (one text encoder): it is a LoRA for Stable Diffusion "
                "1.x/2.x, not SDXL")
    for k in keys:
        if "attn2_to_k.lora_down" in k and np.ndim(sd[k]) == 2:
            ctx = np.shape(sd[k])[1]
            if ctx in (768, 1024):
                return (f"its cross-attention takes {ctx}-dim text features: it is a LoRA for "
                        f"Stable Diffusion {'1.x' if ctx == 768 else '2.x'}, not SDXL")
    if any(("double_blocks" in k or "single_blocks" in k) for k in keys):
        return "it looks like a FLUX LoRA"
    if any("joint_blocks" in k for k in keys):
        return "it looks like an SD3 LoRA"
    if any(("hada_" in k or "lokr_" in k or "oft_" in k) for k in keys):
        return "it is a LyCORIS LoHa/LoKr/OFT file; only LoRA (LoCon) is supported"
    if any(k.endswith(".dora_scale") for k in keys):
        return "it is a DoRA file; DoRA is not supported"
    return None


def expected_shapes(lora_name, org, rank):
    if _is_conv(org):
        kh, kw = org.kernel_size
        return (rank, org.in_channels, kh, kw), (org.out_channels, rank, 1, 1)
    return (rank, org.in_channels), (org.out_channels, rank)


def match_report(weights_sd, network_or_targets):
    """Compare {kohya key: array} with a network (or {lora name: original cell} targets).

    Returns a dict: modules {name: {rank, alpha, kind}}, matched (names), unmatched_keys (keys
    that fit no module), missing_modules (targets absent from the file), problems (strings:
    wrong shapes, missing factors, ranks that disagree), hint (model family guess).
    """
    ranks = {}
    if isinstance(network_or_targets, LoRANetwork):     # its modules' ranks are fixed
        targets = {lora.lora_name: network_or_targets.target_cell(lora)
                   for lora in network_or_targets.loras}
        ranks = {lora.lora_name: lora.lora_dim for lora in network_or_targets.loras}
    else:
        targets = network_or_targets
    modules = split_modules(weights_sd)
    known = {f"{n}{s}" for n in modules for s in _ROLE_SUFFIX.values()}
    unmatched = [k for k in weights_sd if k not in known]
    problems, matched, info = [], [], {}
    for name, entry in modules.items():
        down, up, alpha = entry.get("lora_down"), entry.get("lora_up"), entry.get("alpha")
        rank = None if down is None else int(np.shape(down)[0])
        info[name] = {"rank": rank,
                      "alpha": None if alpha is None else float(np.asarray(alpha, np.float64)),
                      "kind": None}
        if name not in targets:
            unmatched += [k for k in (f"{name}{s}" for s in _ROLE_SUFFIX.values())
                          if k in weights_sd]
            continue
        if down is None or up is None:
            problems.append(f"{name} has no {'lora_down' if down is None else 'lora_up'}.weight")
            continue
        if alpha is not None and np.size(alpha) != 1:
            problems.append(f"{name}.alpha has shape {np.shape(alpha)}, expected a scalar")
            continue
        org = targets[name]
        want_down, want_up = expected_shapes(name, org, ranks.get(name, rank))
        info[name]["kind"] = ("conv" + "x".join(map(str, org.kernel_size))
                              if _is_conv(org) else "linear")
        bad = []
        if tuple(np.shape(down)) != want_down:
            bad.append(f"{name}.lora_down.weight {tuple(np.shape(down))} (expected {want_down})")
        if tuple(np.shape(up)) != want_up:
            bad.append(f"{name}.lora_up.weight {tuple(np.shape(up))} (expected {want_up})")
        if bad:
            problems += bad
        else:
            matched.append(name)
    missing = [n for n in targets if n not in modules]
    shape_problems = [p for p in problems if "expected" in p]
    report = {"modules": info, "matched": matched, "unmatched_keys": sorted(unmatched),
              "missing_modules": missing, "problems": problems,
              "hint": _family_hint(weights_sd) if (unmatched or shape_problems) else None}
    return report


def raise_if_bad(report, source):
    parts = []
    if report["unmatched_keys"]:
        keys = report["unmatched_keys"]
        parts.append(f"{len(keys)} keys match no module of the SDXL model: {_listing(keys)}")
    bad_shapes = [p for p in report["problems"] if "expected" in p]
    if bad_shapes:
        parts.append(f"{len(bad_shapes)} tensors have the wrong shape: {_listing(bad_shapes)}")
    others = [p for p in report["problems"] if "expected" not in p]
    if others:
        parts.append("; ".join(others[:_MAX_LISTED]))
    if parts:
        hint = f" ({report['hint']})" if report.get("hint") else ""
        raise UserError(f"{source} does not fit this SDXL model{hint}: " + "; ".join(parts))


def model_targets(text_encoders, unet, conv=True):
    """{lora name: original cell} for every module a LoRA file may hold for these models
    (kohya's create_network_from_weights targets: conv classes included)."""
    targets = {}
    for prefix, te in zip(TE_PREFIXES, _text_encoder_list(text_encoders)):
        for mp, cp, child in _target_children(te, TEXT_ENCODER_TARGET_CLASSES):
            targets[lora_name_for(prefix, mp, cp)] = child
    if unet is not None:
        classes = UNET_TARGET_CLASSES + (UNET_TARGET_CLASSES_CONV2D_3X3 if conv else ())
        for mp, cp, child in _target_children(unet, classes):
            targets[lora_name_for(UNET_PREFIX, mp, cp)] = child
    return targets


def save_lora_file(file, state_dict, dtype=None, metadata=None):
    """Write {kohya key: array} like kohya's save_weights: the factors in `dtype` (None keeps
    them; "float"/"fp16"/"bf16"), `.alpha` always a float32 scalar, `metadata` plus the sshs
    hashes (computed as kohya does, over this exact serialisation); atomically."""
    from library import metadata as md_lib
    if dtype is not None and not isinstance(dtype, str):
        dtype = {ms.float32: "float", ms.float16: "fp16", ms.bfloat16: "bf16"}[dtype]
    if dtype not in SAVE_DTYPES:
        raise UserError(f"unknown save precision {dtype!r}; choose float, fp16 or bf16")
    save_dtype = SAVE_DTYPES[dtype]
    tensors, dtypes = {}, {}
    for key, value in state_dict.items():
        if key.endswith(".alpha"):
            tensors[key] = np.asarray(value, dtype=np.float32).reshape(())
            dtypes[key] = "float32"
        else:
            tensors[key] = np.asarray(value)
            dtypes[key] = save_dtype
    metadata = dict(metadata or {})
    model_hash, legacy_hash = md_lib.precalculate_safetensors_hashes(tensors, metadata, dtypes)
    metadata["sshs_model_hash"] = model_hash
    metadata["sshs_legacy_hash"] = legacy_hash
    write_safetensors(file, tensors, metadata=metadata, dtype=dtypes)
