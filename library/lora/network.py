"""kohya's LoRANetwork for SDXL: builds the modules for the models' targets, attaches them, and
holds their weights, merge, multiplier, optimizer groups and max-norm regularisation.

The network is a plain Python object, not a Cell: its branches live inside the models' cell
trees (library/lora/__init__.py), and it keeps the list of them and where each sits. One class
with kohya's whole method set (its trainer and tools call them by name), so one file.
"""

from typing import NamedTuple, Sequence

import numpy as np
import mindspore as ms
from mindspore import nn, ops, Parameter, Tensor

from library import layers
from library.errors import UserError, listing
from library.lora.files import load_lora_file, save_lora_file
from library.lora.keys import split_modules
from library.lora.matching import match_report, raise_if_bad
from library.lora.modules import HOSTS, LoRAConv2d, LoRADense, LoRAModule, delta_weight, is_conv, keep_sample_axis
from library.lora.names import (TE_PREFIXES, TEXT_ENCODER_TARGET_CLASSES, UNET_PREFIX,
                                UNET_TARGET_CLASSES, UNET_TARGET_CLASSES_CONV2D_3X3, get_block_index,
                                lora_name_for)
from library.lora.targets import replace_child, resolve, target_children, text_encoder_list


class ParamGroup(NamedTuple):
    """One optimizer group: its Parameters, learning rate and a name for logs (kohya's
    prepare_optimizer_params returns these; library/training/optimizer_cells.py takes them)."""
    params: Sequence
    lr: float
    description: str


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
        text_encoders = text_encoder_list(text_encoders)
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
            for module_path, child_path, child in target_children(root, target_classes):
                name = lora_name_for(prefix, module_path, child_path)
                is_linear_like = not is_conv(child) or tuple(child.kernel_size) == (1, 1)
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

    def target_path(self, lora):
        """The module path, inside its model, of the cell `lora` targets (`input_blocks.4.1.
        transformer_blocks.0.attn1.to_q`)."""
        return self._places[lora.lora_name][1]

    def _parent_of(self, lora):
        root, path = self._places[lora.lora_name]
        return resolve(root, path)

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
            if not isinstance(cell, HOSTS):
                names = {"weight": cell.weight.name}
                if cell.has_bias:
                    names["bias"] = cell.bias.name
                host = LoRAConv2d(cell) if is_conv(cell) else LoRADense(cell)
                host.set_train(parent.training)
                replace_child(parent, key, host)
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
            keep_sample_axis(self._models_of(self.unet_loras))
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
        targets = {lora.lora_name: self.target_cell(lora) for lora in self.loras}
        ranks = {lora.lora_name: lora.lora_dim for lora in self.loras}
        report = match_report(weights_sd, targets, ranks)
        if not allow_missing and report["missing_modules"]:
            report["problems"].append(
                f"{len(report['missing_modules'])} modules of the network are not in the file: "
                f"{listing(report['missing_modules'])}")
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


def _unet_config(network):
    for lora in network.unet_loras:
        return getattr(network._places[lora.lora_name][0], "cfg", None)
    return None


def add_to_weight(param, delta):
    """param += delta (float32 arithmetic, stored back in the parameter's dtype)."""
    base = param.astype(ms.float32).asnumpy()
    param.set_data(Tensor(base + delta.reshape(base.shape), param.dtype))
