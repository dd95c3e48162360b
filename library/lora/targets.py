"""Where a LoRA attaches in the models' cell trees: the Dense/Conv2d layers inside kohya's target
classes, in kohya's order, with their kohya names; the expected factor shapes of each; and the
parent lookups that let a host cell replace the original in place.
"""

from mindspore import nn

from library.lora.modules import HOSTS, is_conv, is_linear
from library.lora.names import (TE_PREFIXES, TEXT_ENCODER_TARGET_CLASSES, UNET_PREFIX,
                                UNET_TARGET_CLASSES, UNET_TARGET_CLASSES_CONV2D_3X3, lora_name_for)


def walk(cell, path=""):
    """(path, cell) for `cell` and its descendants, not descending into LoRA hosts."""
    yield path, cell
    if isinstance(cell, HOSTS):
        return
    for name, child in cell.name_cells().items():
        yield from walk(child, f"{path}.{name}" if path else name)


def target_children(root, target_classes):
    """(module path, child path, child) for each Dense/Conv2d inside a target-class cell, in
    tree order (kohya's create_modules loop)."""
    for path, cell in walk(root):
        if type(cell).__name__ not in target_classes:
            continue
        for child_path, child in walk(cell):
            if child_path and (is_linear(child) or is_conv(child)):
                yield path, child_path, child


def resolve(root, path):
    """(parent cell, key) of the cell at `path` under `root`."""
    parts = path.split(".")
    parent = root
    for part in parts[:-1]:
        parent = parent.name_cells()[part]
    return parent, parts[-1]


def replace_child(parent, key, new):
    if isinstance(parent, (nn.SequentialCell, nn.CellList)):
        parent[int(key)] = new
    else:
        setattr(parent, key, new)


def text_encoder_list(text_encoders):
    if text_encoders is None:
        return []
    if isinstance(text_encoders, (list, tuple)):
        if len(text_encoders) not in (0, 2):
            raise ValueError("SDXL LoRA needs both text encoders: [text_encoder1, text_encoder2]")
        return list(text_encoders)
    raise ValueError("pass the SDXL text encoders as a list [text_encoder1, text_encoder2]")


def model_targets(text_encoders, unet, conv=True):
    """{lora name: original cell} for every module a LoRA file may hold for these models
    (kohya's create_network_from_weights targets: conv classes included)."""
    targets = {}
    for prefix, te in zip(TE_PREFIXES, text_encoder_list(text_encoders)):
        for mp, cp, child in target_children(te, TEXT_ENCODER_TARGET_CLASSES):
            targets[lora_name_for(prefix, mp, cp)] = child
    if unet is not None:
        classes = UNET_TARGET_CLASSES + (UNET_TARGET_CLASSES_CONV2D_3X3 if conv else ())
        for mp, cp, child in target_children(unet, classes):
            targets[lora_name_for(UNET_PREFIX, mp, cp)] = child
    return targets


def expected_shapes(org, rank):
    """(lora_down shape, lora_up shape) of a rank-`rank` module on the cell `org`."""
    if is_conv(org):
        kh, kw = org.kernel_size
        return (rank, org.in_channels, kh, kw), (org.out_channels, rank, 1, 1)
    return (rank, org.in_channels), (org.out_channels, rank)
