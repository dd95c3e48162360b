"""Saves that fail without losing what was already saved: a full disk (ENOSPC), a file-size
limit (EFBIG), a quota or an I/O error at a save.

    saves = SaveGroup()                 # the saves of one step (LoRA, state, ...)
    if saves.attempt(path, write): ...  # an OSError is remembered, the group goes on
    saves.raise_if_failed(step)         # then the run stops with one message: what failed, what
                                        # was saved, what to do

Every file is written to a temporary name and renamed (library.safetensors_io.write_atomically,
library.training.state.save_state), so a failed save leaves the previous file of that name
intact and removes its own temp file; the LoRA stays in memory until the step's other saves
have been tried (the final LoRA is small, its state folder is not).

Also here: the start-up estimate of what a run will write against the free space, and the
removal of temp entries that a killed run left in the output folder.
"""

import logging
import os
import re
import shutil
import time

from library.errors import UserError

logger = logging.getLogger("sdxl_train_network")

TEMP_PREFIX = ".tmp-"
_TEMP_PID = re.compile(r"^\.tmp-(\d+)-")
# temp names written before they carried their writer's pid: old enough means abandoned
_UNOWNED_TEMP_AGE = 3600.0


class SaveFailed(UserError):
    """A save of the run failed (disk full, file-size limit, I/O error)."""


class SaveGroup:
    def __init__(self):
        self.saved, self.failed = [], []

    def attempt(self, path, write):
        """Run `write()`, which writes `path`; True if it did. An OSError is remembered (the
        path and the system's reason, for raise_if_failed's one message), so the caller goes
        on to its next save instead of losing the LoRA it still holds in memory."""
        try:
            write()
        except OSError as e:
            self.failed.append((path, e.strerror or str(e)))
            return False
        self.saved.append(path)
        return True

    def raise_if_failed(self, step):
        if not self.failed:
            return
        failed = "; ".join(f"{path} ({reason})" for path, reason in self.failed)
        kept = (f" Saved at this step: {', '.join(self.saved)}." if self.saved
                else " Nothing could be saved at this step.")
        raise SaveFailed(
            f"the save at step {step} failed: {failed}.{kept} Files saved before are intact; "
            "free space in the output folder (or raise the file-size limit), then continue from "
            "the newest -state folder with --resume, or start again")


# --- before the run ---------------------------------------------------------------------------

def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:     # another user's process
        return True
    return True


def remove_stale_temp(folder, now=None):
    """Remove the `.tmp-*` files and folders of runs that were killed during a save (nothing
    else removes them); a live process's temp entries are kept, since another run may be saving
    into the same folder right now. Returns the names removed."""
    if not os.path.isdir(folder):
        return []
    now = time.time() if now is None else now
    removed = []
    for name in sorted(os.listdir(folder)):
        if not name.startswith(TEMP_PREFIX):
            continue
        path = os.path.join(folder, name)
        match = _TEMP_PID.match(name)
        try:
            if match:
                stale = not _pid_alive(int(match.group(1)))
            else:
                stale = now - os.lstat(path).st_mtime > _UNOWNED_TEMP_AGE
            if not stale:
                continue
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
        except FileNotFoundError:   # under msrun every rank cleans up: another one was first
            continue
        removed.append(name)
    if removed:
        logger.info(f"removed {len(removed)} temp file(s) that an interrupted save left in "
                    f"{folder}: {', '.join(removed[:5])}{' ...' if len(removed) > 5 else ''}")
    return removed


def _kept(saves, limit):
    return min(saves, limit) if limit else saves


def planned_writes(args, num_epochs, lora_bytes, state_bytes, sample_images=0,
                   sample_image_bytes=0):
    """[(what, bytes)] a run has on disk at most, from its save options (kohya's counts: each
    --save_every_n_* save is kept unless --save_last_n_* (_state) lets it go), plus the final
    save and one temp copy while the next save is written."""
    every_step, every_epoch = args.save_every_n_steps, args.save_every_n_epochs
    step_saves = (args.max_train_steps - 1) // every_step if every_step else 0
    epoch_saves = (num_epochs - 1) // every_epoch if every_epoch else 0

    def kept(keep_steps, keep_epochs):
        # --save_last_n_steps counts steps (filenames.step_to_remove), _epochs counts saves
        step_limit = keep_steps // every_step + 1 if keep_steps and every_step else None
        return _kept(step_saves, step_limit) + _kept(epoch_saves, keep_epochs) + 2

    files = kept(args.save_last_n_steps, args.save_last_n_epochs)
    writes = [(f"{files} LoRA file(s) of {_human(lora_bytes)}", files * lora_bytes)]
    states = 0
    if args.save_state:
        states = kept(args.save_last_n_steps_state or args.save_last_n_steps,
                      args.save_last_n_epochs_state or args.save_last_n_epochs)
    elif args.save_state_on_train_end:
        states = 2
    if states:
        writes.append((f"{states} state folder(s) of {_human(state_bytes)}", states * state_bytes))
    if sample_images:
        writes.append((f"{sample_images} sample image(s)", sample_images * sample_image_bytes))
    return writes


def _human(n):
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def disk_cache_writes(group, latents, text, text_tokens):
    """{image folder: [(what, bytes)]} for --cache_latents_to_disk / --cache_text_encoder_outputs
    _to_disk, whose .npz files go beside the images (float32, uncompressed: an upper bound, as
    entries already cached are counted too), one folder per file system."""
    per_device, folders = {}, {}
    for _, record in group.records():
        folder = os.path.dirname(os.path.abspath(record.path))
        device = os.stat(folder).st_dev
        folders.setdefault(device, folder)
        sizes = per_device.setdefault(device, [0, 0])
        if latents:
            w, h = record.bucket.bucket_wh
            latent = 4 * (w // 8) * (h // 8) * 4
            sizes[0] += latent * (2 if record.subset.flip_aug else 1)
            sizes[0] += w * h * 4 if record.subset.alpha_mask else 0
        if text:
            sizes[1] += (text_tokens * 2048 + 1280) * 4     # SDXL's context and pooled output
    return {folders[d]: [(what, n) for what, n in zip(("latent caches", "text-encoder caches"), s)
                         if n] for d, s in per_device.items()}


SAVES_HINT = "keep fewer saves with --save_last_n_steps / --save_last_n_epochs"
CACHES_HINT = "cache in memory instead (--cache_latents / --cache_text_encoder_outputs)"


def free_space_warning(folder, writes, free=None, label="--output_dir", hint=SAVES_HINT):
    """A warning text when `folder`'s file system has less free space than `writes` need."""
    needed = sum(b for _, b in writes)
    free = shutil.disk_usage(folder).free if free is None else free
    if free >= needed:
        return None
    return (f"{label} {folder} has {_human(free)} free, and this run writes up to "
            f"{_human(needed)} there ({', '.join(w for w, _ in writes)}): a save may fail when "
            f"the disk is full. Free space, or {hint}")


def warn_if_disk_short(args, plan, trainable, apply_step, save_dtype, sample_prompts):
    """Before step 1: what the run will write (after its caches, which are written by now)
    against the output folder's free space."""
    from library.training.samples import is_due
    from library.training.state import state_parameters
    itemsize = {None: None, "float32": 4, "float16": 2, "bfloat16": 2}[save_dtype]
    lora = sum(p.size * (itemsize or p.itemsize) for p in trainable)
    state = sum(p.size * p.itemsize for params in state_parameters(trainable, apply_step)
                for p in params.values())
    samplings = (sum(is_due(args, s) for s in range(args.max_train_steps + 1))
                 + sum(is_due(args, 1, e) for e in range(1, plan.num_epochs + 1)))
    image = max((p.width * p.height * 3 for p in sample_prompts), default=0)  # raw RGB bound
    warning = free_space_warning(args.output_dir, planned_writes(
        args, plan.num_epochs, lora, state, samplings * len(sample_prompts), image))
    if warning:
        logger.warning(warning)


def warn_if_caches_short(args, plan):
    """Before the caches are written: their files against the free space beside the images."""
    tokens = 77 * ((args.max_token_length or 75) // 75)
    groups = [g for g in (plan.train_group, plan.val_group) if g is not None]
    for group in groups:
        for folder, writes in disk_cache_writes(
                group, args.cache_latents_to_disk, args.cache_text_encoder_outputs_to_disk,
                tokens).items():
            warning = free_space_warning(folder, writes, label="the image folder",
                                         hint=CACHES_HINT)
            if warning:
                logger.warning(warning)
