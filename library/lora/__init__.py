"""LoRA for the SDXL UNet and both text encoders, with kohya-ss/sd-scripts' file format.

`networks/lora.py` (kohya's `--network_module networks.lora`) is the entry point; this package
holds the parts, one job per file, each layer importing only the ones before it:

    names.py     kohya's prefixes, target classes, module names and UNet block index (plain Python)
    args.py      --network_args parsing and checks, block LR weights (plain Python: runs before
                 MindSpore is imported, so a bad value fails in a fraction of a second)
    modules.py   the cells: a LoRA branch and the Dense/Conv2d hosts that carry branches
    targets.py   which layers of the models get a module, in kohya's order; factor shapes
    keys.py      other tools' key styles -> kohya's names; kohya keys -> modules (numpy)
    matching.py  does a file fit these models: the report and the one error naming what does not
    files.py     reading any key style, writing kohya's layout and hashes, atomically
    network.py   kohya's LoRANetwork: build, attach, weights, merge, multiplier, optimizer groups

The same targets, key names, initialisation, scale (alpha / rank), dropouts, `--network_args`
and parameter groups as kohya, so a LoRA trained here loads in kohya, ComfyUI, A1111/Forge and
diffusers, and theirs load here (docs/lora.md).

How it attaches (MindSpore's graph mode cannot patch a cell's forward as kohya does): the
targeted `nn.Dense` / `nn.Conv2d` cells are replaced *in place* by a host cell
(`LoRADense` / `LoRAConv2d`) that keeps the original `weight` / `bias` Parameters under their
original names (checkpoint I/O is unaffected) and holds a list of LoRA branches
(`lora_branches.<i>`), one per applied network. A branch (`LoRAModule`) owns `lora_down`,
`lora_up` and shares its network's `multiplier` Parameter, so the multiplier can be changed
between calls of a compiled graph without recompiling. Branch parameters are named with their
kohya keys (`lora_unet_..._to_q.lora_down.weight`), unique across the three models.
"""
