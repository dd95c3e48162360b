"""Training state folders (--save_state, --save_state_on_train_end, --resume): everything a run
needs to continue exactly where it stopped.

A state folder holds
    train_state.json      kohya's {"current_epoch", "current_step"} plus what kohya does not keep:
                          the data position inside the epoch, the seed, the running loss sums,
                          the names and shapes of every saved tensor and the optimizer's flat
                          layout (which parameter sits where in each flat state vector; all
                          checked on resume)
    network.safetensors   the trainable LoRA parameters, float32, by parameter name
    optimizer.safetensors every other Parameter of the apply step: the optimizer's flat moments
                          (one vector per parameter group, library.training.flat) and step
                          counter, Prodigy's d, the fp16 loss scale ... (not the gradient buffers,
                          which are zero after an optimizer step)

No random-number state is needed: every random draw of a batch (noise, timesteps, VAE sample,
caption shuffles, augmentation) is seeded by (seed, epoch, batch index), so the position is enough.
The exception is LoRA dropout (--network_dropout, rank/module dropout), drawn inside the step
graph from MindSpore's own generator, which a resume does not reproduce.

The folder is written under a temporary name and renamed when complete, so a kill during a save
never leaves a folder with the final name; `read_progress` also refuses a folder without a
complete train_state.json.
"""

import json
import logging
import os
import shutil
import time

import numpy as np

from library.errors import UserError
from library.safetensors_io import SafetensorsFile, write_atomically, write_safetensors

PROGRESS_FILE = "train_state.json"
NETWORK_FILE = "network.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
FORMAT = "sdxl-mindspore-lora-state/2"
# /1: the optimizer state was one tensor per LoRA parameter (before the flat layout)
PER_TENSOR_FORMAT = "sdxl-mindspore-lora-state/1"

logger = logging.getLogger(__name__)


# --- what a state holds -----------------------------------------------------------------------

def state_parameters(trainable, apply_step):
    """(network params, optimizer-side params), each name -> Parameter, as saved and restored."""
    network = {p.name: p for p in trainable}
    skip = set(network) | {p.name for p in apply_step.grad_buffers} | \
        apply_step.optimizer.scratch_names
    optimizer = {p.name: p for p in apply_step.get_parameters() if p.name not in skip}
    return network, optimizer


def _tensors(params):
    return {name: p.asnumpy() for name, p in params.items()}


def _shapes(params):
    return {name: [list(p.shape), str(p.dtype)] for name, p in params.items()}


def save_state(folder, trainable, apply_step, progress):
    """Write a complete state folder at `folder` (replacing an older one of that name).

    progress: JSON-safe dict with at least current_epoch, current_step, data_position, seed.
    """
    network, optimizer = state_parameters(trainable, apply_step)
    parent = os.path.dirname(os.path.abspath(folder))
    tmp = os.path.join(parent, f".tmp-{os.getpid()}-{os.path.basename(folder)}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        write_safetensors(os.path.join(tmp, NETWORK_FILE), _tensors(network))
        write_safetensors(os.path.join(tmp, OPTIMIZER_FILE), _tensors(optimizer))
        record = {"format": FORMAT, **progress, "saved_at": time.time(),
                  "network_tensors": _shapes(network), "optimizer_tensors": _shapes(optimizer),
                  "flat_layout": apply_step.optimizer.layout.description()}
        # last: a folder whose progress file is missing or partial is not a state
        write_atomically(os.path.join(tmp, PROGRESS_FILE),
                         [json.dumps(record, indent=1).encode()])
        if os.path.exists(folder):
            old = f"{tmp}-old"
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def remove_state(folder):
    if os.path.isdir(folder):
        shutil.rmtree(folder)
        return True
    return False


def read_progress(folder):
    """The progress record of a state folder; a UserError says what is wrong with it."""
    if not os.path.isdir(folder):
        raise UserError(f"--resume {folder}: not a folder (give a state folder such as "
                        f"<output_dir>/<name>-step00000100-state)")
    path = os.path.join(folder, PROGRESS_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except FileNotFoundError:
        raise UserError(f"--resume {folder}: no {PROGRESS_FILE}; this is not a complete state "
                        "folder (written by --save_state)") from None
    except (OSError, ValueError) as e:
        raise UserError(f"--resume {folder}: {PROGRESS_FILE} is unreadable ({e})") from None
    if record.get("format") == PER_TENSOR_FORMAT:
        raise UserError(f"--resume {folder}: this state was saved by an earlier version of this "
                        "trainer, which kept the optimizer state per LoRA tensor; this version "
                        "keeps it in flat vectors per parameter group and cannot resume it. "
                        "Start a new run from the LoRA file saved at the same step "
                        f"(--network_weights <output_dir>/<name>-step{record.get('current_step', 0):08d}"
                        ".safetensors, or the epoch's file), or resume with the version that "
                        "saved it")
    if record.get("format") != FORMAT:
        raise UserError(f"--resume {folder}: {PROGRESS_FILE} is not a state of this trainer "
                        f"(format {record.get('format')!r}, expected {FORMAT!r}); kohya's PyTorch "
                        "state folders cannot be resumed here (start from its LoRA with "
                        "--network_weights instead)")
    for name in (NETWORK_FILE, OPTIMIZER_FILE):
        if not os.path.isfile(os.path.join(folder, name)):
            raise UserError(f"--resume {folder}: {name} is missing")
    return record


def check_compatible(record, folder, args, world_size):
    """Options that must not change between the saved run and the resumed one."""
    saved_world = record.get("world_size", 1)
    if saved_world != world_size:
        raise UserError(f"--resume {folder}: the state was saved by a run on {saved_world} "
                        f"process(es), this one has {world_size}; the data position is only "
                        "valid for the same msrun --worker_num")
    if record["seed"] != args.seed:
        raise UserError(f"--resume {folder}: the state was saved by a run with --seed "
                        f"{record['seed']}, this run has {args.seed}; resume with the same seed")
    if record["current_step"] > args.max_train_steps:
        raise UserError(f"--resume {folder}: the state is at step {record['current_step']}, past "
                        f"--max_train_steps {args.max_train_steps}")
    if record["max_train_steps"] != args.max_train_steps:
        logger.warning(f"--resume: the saved run had --max_train_steps {record['max_train_steps']}, "
                       f"this one {args.max_train_steps}: the LR schedule changes from here on")


def _restore(params, path, expected, folder, what):
    f = SafetensorsFile(path)
    if set(f.keys()) != set(params) or set(expected) != set(params):
        missing = sorted(set(params) - set(f.keys()))[:3]
        extra = sorted(set(f.keys()) - set(params))[:3]
        raise UserError(f"--resume {folder}: its {what} does not match this run's (missing "
                        f"{missing}, unexpected {extra}); resume with the network and optimizer "
                        "options of the saved run")
    for name, p in params.items():
        value = f.get(name)
        if tuple(value.shape) != tuple(p.shape):
            raise UserError(f"--resume {folder}: {what} tensor {name} has shape "
                            f"{tuple(value.shape)}, this run's has {tuple(p.shape)}; resume with "
                            "the saved run's --network_dim / network_args")
        p.set_data(_as_tensor(value, p.dtype))


def _as_tensor(value, dtype):
    from mindspore import Tensor
    return Tensor(np.ascontiguousarray(value)).astype(dtype)


def load_state(folder, trainable, apply_step):
    """Write the saved tensors into the run's Parameters; returns the progress record.

    Call before the step graphs are first run: a function already compiled with ms.jit does not
    see host-side set_data (MindSpore 2.7.1).
    """
    record = read_progress(folder)
    network, optimizer = state_parameters(trainable, apply_step)
    _restore(network, os.path.join(folder, NETWORK_FILE), record["network_tensors"], folder,
             "LoRA network")
    layout = apply_step.optimizer.layout.description()
    if record["flat_layout"] != layout:
        saved = [(g["name"], len(g["params"])) for g in record["flat_layout"]]
        ours = [(g["name"], len(g["params"])) for g in layout]
        raise UserError(f"--resume {folder}: its optimizer state is laid out for other parameter "
                        f"groups (segments and tensor counts {saved}, this run's {ours}, or the "
                        "same counts in another order); resume with the saved run's network, "
                        "--text_encoder_lr / --unet_lr and network_args")
    _restore(optimizer, os.path.join(folder, OPTIMIZER_FILE), record["optimizer_tensors"], folder,
             "optimizer state")
    return record
