"""LoRAs at generation time, the three ways kohya's sdxl_gen_img applies them (1667-1741, 2312-2325):

- unmerged (default): each network's branches are inserted into the models; its multiplier is a
  Parameter the compiled step reads, so per-prompt `--am` multipliers need no recompile;
- merged (`--network_merge`, or the first N with `--network_merge_n_models`): multiplier * dW is
  added into the base weights once; per-prompt multipliers cannot change it;
- pre-calculated (`--network_pre_calc`): before each batch whose multipliers differ from the last,
  the base weights are restored and every network is merged with the batch's multipliers.
Also: `replace_vae`, a replacement VAE from a file (`--vae`).
"""

import importlib
import logging
import os

import numpy as np

from library.errors import UserError

logger = logging.getLogger(__name__)


def parse_network_args(items, count):
    """kohya's --network_args: one entry per network, each "k=v;k2=v2"."""
    if not items:
        return [{} for _ in range(count)]
    if len(items) != count:
        raise UserError(f"--network_args has {len(items)} entries for {count} network(s): give one "
                        "per --network_weights (\"k=v;k2=v2\", or \"\" for none)")
    out = []
    for item in items:
        kwargs = {}
        for pair in filter(None, (p.strip() for p in item.split(";"))):
            key, sep, value = pair.partition("=")
            if not sep:
                raise UserError(f"--network_args: {pair!r} is not key=value")
            kwargs[key.strip()] = value.strip()
        out.append(kwargs)
    return out


def resolve_muls(muls, defaults):
    """Per-prompt multipliers (--am) padded with their last value, as kohya."""
    if muls is None:
        return list(defaults)
    muls = list(muls)
    if len(muls) > len(defaults):
        raise UserError(f"--am gives {len(muls)} multipliers for {len(defaults)} network(s)")
    return muls + [muls[-1]] * (len(defaults) - len(muls))


def check_counts(modules, weights, muls):
    """(modules, muls) with one entry per weights file, or a UserError naming the options (also
    called by cli.check_args, before the model load)."""
    weights = list(weights or [])
    if not weights:
        raise UserError("--network_module needs --network_weights (one file per network)")
    modules = list(modules or [])
    if len(modules) == 1 and len(weights) > 1:
        modules = modules * len(weights)
    if len(modules) != len(weights):
        raise UserError(f"{len(modules)} --network_module for {len(weights)} --network_weights: "
                        "give one module per weights file (or one for all)")
    muls = [1.0] * len(weights) if not muls else list(muls)
    if len(muls) != len(weights):
        raise UserError(f"{len(muls)} --network_mul for {len(weights)} --network_weights")
    return modules, muls


class GenerationNetworks:
    def __init__(self, models, modules, weights, muls=None, merge=False, merge_n_models=None,
                 pre_calc=False, network_args=None):
        weights = list(weights or [])
        modules, muls = check_counts(modules, weights, muls)
        for path in weights:
            if not os.path.isfile(path):
                raise UserError(f"LoRA file not found: {path}")
        n_merge = len(weights) if merge else (merge_n_models or 0)
        if pre_calc and n_merge:
            raise UserError("--network_pre_calc cannot be combined with --network_merge / "
                            "--network_merge_n_models")
        kwargs_list = parse_network_args(network_args, len(weights))
        text_encoders = [models.text_encoder1, models.text_encoder2]
        self.names = [os.path.splitext(os.path.basename(p))[0] for p in weights]
        self.default_muls = muls
        self.merged = [i < n_merge for i in range(len(weights))]
        self.pre_calc = pre_calc
        self.nets, self.weights_sds = [], []
        self._backup = {}
        self._current = None
        for i, (module_name, path, mul, kwargs) in enumerate(zip(modules, weights, muls, kwargs_list)):
            try:
                module = importlib.import_module(module_name)
            except ImportError as e:
                raise UserError(f"--network_module {module_name}: cannot import it ({e}); "
                                "use networks.lora") from None
            if not hasattr(module, "create_network_from_weights"):
                raise UserError(f"--network_module {module_name} has no create_network_from_weights")
            net, sd = module.create_network_from_weights(mul, path, models.vae, text_encoders,
                                                         models.unet, for_inference=True, **kwargs)
            if self.merged[i]:
                net.merge_to(text_encoders, models.unet, weights_sd=sd, multiplier=mul)
                logger.info("merged %s x %g into the model weights", path, mul)
            elif pre_calc:
                for lora in net.loras:
                    param = net.target_cell(lora).weight
                    self._backup.setdefault(id(param), (param, param.asnumpy().copy()))
                logger.info("loaded %s (pre-calculated per batch)", path)
            else:
                net.apply_to(text_encoders, models.unet)
                net.load_state_dict(sd)
                net.set_multiplier(mul)
                logger.info("applied %s x %g (unmerged)", path, mul)
            self.nets.append(net)
            self.weights_sds.append(sd)

    def check_muls(self, muls):
        if muls is None:
            return
        resolved = resolve_muls(muls, self.default_muls)
        for name, merged, m, d in zip(self.names, self.merged, resolved, self.default_muls):
            if merged and m != d:
                raise UserError(f"--am {m:g} for {name}, which is merged into the weights at {d:g} "
                                "(--network_merge); drop --network_merge to vary it per prompt")

    def activate(self, muls):
        """Set the multipliers for the next batch; returns them (one per network)."""
        resolved = resolve_muls(muls, self.default_muls)
        if resolved == self._current:
            return resolved
        if self.pre_calc:
            from mindspore import Tensor
            for param, original in self._backup.values():
                param.set_data(Tensor(original, dtype=param.dtype))
            for net, sd, m in zip(self.nets, self.weights_sds, resolved):
                net.merge_to(weights_sd=sd, multiplier=m)
        else:
            for net, merged, m in zip(self.nets, self.merged, resolved):
                if not merged:
                    net.set_multiplier(m)
        self._current = resolved
        return resolved


def show_metadata(paths):
    """--network_show_meta: print each LoRA file's safetensors metadata."""
    from library.safetensors_io import SafetensorsFile
    for path in paths:
        meta = SafetensorsFile(path).metadata
        print(f"metadata of {path}:")
        for k in sorted(meta):
            print(f"  {k}: {meta[k][:200]}")


def replace_vae(models, path):
    """Load a VAE from `path` into models.vae, strictly: a standalone VAE file (SGM/LDM names, or
    diffusers names), or a full SDXL single-file checkpoint (its first_stage_model.* tensors)."""
    from mindspore import Tensor
    from library.models import keymaps
    from library.safetensors_io import SafetensorsFile
    if os.path.isdir(path):
        candidates = [os.path.join(path, "vae", f"diffusion_pytorch_model{s}.safetensors")
                      for s in ("", ".fp16")] + [os.path.join(path, f"diffusion_pytorch_model{s}.safetensors")
                                                   for s in ("", ".fp16")]
        found = [c for c in candidates if os.path.isfile(c)]
        if not found:
            raise UserError(f"--vae {path}: no diffusion_pytorch_model.safetensors in it or in its vae/ folder")
        path = found[0]
    if not os.path.isfile(path):
        raise UserError(f"--vae: file not found: {path}")
    st = SafetensorsFile(path)
    keys = set(st.keys())
    prefix = keymaps.SINGLE_FILE_PREFIXES["vae"]
    cfg = models.config
    plan, missing = [], []
    for name, param in models.vae.parameters_and_names():
        diff = keymaps.diffusers_place("vae", name, cfg).key
        key = next((k for k in (name, prefix + name, diff) if k in keys), None)
        if key is None:
            missing.append(name)
            continue
        if int(np.prod(st.shape(key))) != int(np.prod(param.shape)):
            raise UserError(f"--vae {path}: {key} has shape {st.shape(key)}, expected {tuple(param.shape)}")
        plan.append((param, key))
    if missing:
        raise UserError(f"--vae {path} is not an SDXL VAE of this model: {len(missing)} tensors "
                        f"missing, e.g. {', '.join(missing[:5])}")
    for param, key in plan:
        param.set_data(Tensor(np.asarray(st.get(key), np.float32).reshape(param.shape), dtype=param.dtype))
    logger.info("loaded VAE %s", path)
