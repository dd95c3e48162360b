"""Every file a run writes besides its logs: the LoRA at steps, epochs, an interruption and the
end; with --save_state the state folder beside each, which --resume continues exactly; and the
older ones that --save_last_n_* (_state) let go, as kohya names and rotates them.

    progress = Progress()                          # the loop advances it
    saves = Checkpoints(plan, training, world, log, metadata, progress)
    start_epoch = saves.resume()                   # with --resume: restores progress and data position
    saves.every("step", progress.step, epoch)      # --save_every_n_steps / _epochs, with rotation
    saves.interrupted(epoch)                       # after Ctrl-C: save, then raise Interrupted
    final = saves.last(epoch)

Each save is attempted in a SaveGroup (library/training/saving.py): a full disk fails it with one
message, and the other saves of that step are still tried before the run stops. Under msrun
rank 0 writes every file; every rank first checks that its LoRA weights equal the others'.
"""

import logging
import os
from dataclasses import dataclass

from library.data.fingerprint import dataset_record
from library.lora.files import SAVE_DTYPES
from library.training import distributed
from library.training import filenames as names
from library.training.interrupts import Interrupted
from library.training.run_metadata import at_save
from library.training.saving import SaveGroup
from library.training.state import load_state, remove_state, save_state

logger = logging.getLogger("sdxl_train_network")

# kind -> (file name, state folder name, which older save to remove, its --save_last_n_* options)
_ROTATIONS = {
    "step": (names.step_name, names.step_state_name, names.step_to_remove,
             "save_last_n_steps", "save_last_n_steps_state"),
    "epoch": (names.epoch_name, names.epoch_state_name, names.epoch_to_remove,
              "save_last_n_epochs", "save_last_n_epochs_state"),
}


@dataclass
class Progress:
    """Where the run is: optimizer steps done and the running loss (what a state folder saves)."""
    step: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0

    def add_loss(self, loss):
        self.loss_sum, self.loss_count = self.loss_sum + loss, self.loss_count + 1

    @property
    def average_loss(self):
        return self.loss_sum / self.loss_count


class Checkpoints:
    def __init__(self, plan, training, world, log, metadata, progress):
        self.args, self.resume_record = plan.args, plan.resume
        self.world, self.log, self.progress = world, log, progress
        self.network, self.loader, self.apply_step = training.network, training.loader, training.apply_step
        self.trainable = list(training.grad_step.trainable)
        self.metadata = metadata
        self.save_dtype = SAVE_DTYPES[plan.args.save_precision]
        self.dataset = dataset_record(plan.train_group)    # what a --resume is checked against

    def _path(self, name):
        return os.path.join(self.args.output_dir, name)

    # -- one file or folder ------------------------------------------------------------------

    def _save_lora(self, filename, epoch, saves):
        path, step = self._path(filename), self.progress.step
        distributed.check_replicas(self.world, self.trainable, step, self.log)
        if not self.world.is_main:
            return path
        if saves.attempt(path, lambda: self.network.save_weights(
                path, dtype=self.save_dtype, metadata=at_save(self.metadata, step, epoch, self.args.no_metadata))):
            self.log.event("save", path=path, step=step, epoch=epoch)
            return path
        return None

    def _save_state(self, folder_name, epoch, saves):
        path, p = self._path(folder_name), self.progress
        if not self.world.is_main:   # the ranks' weights were compared by the save just before
            return path
        record = {"current_epoch": epoch, "current_step": p.step, "seed": self.args.seed,
                  "data_position": self.loader.state_dict(),
                  "max_train_steps": self.args.max_train_steps, "loss_sum": p.loss_sum,
                  "loss_count": p.loss_count, "world_size": self.world.size, "dataset": self.dataset}
        if saves.attempt(path, lambda: save_state(path, self.trainable, self.apply_step, record)):
            self.log.event("save_state", path=path, step=p.step, epoch=epoch)
            return path
        return None

    def _remove_lora(self, filename):
        path = self._path(filename)
        if self.world.is_main and os.path.exists(path):
            os.unlink(path)
            self.log.event("remove", path=path)

    def _remove_state(self, folder_name):
        path = self._path(folder_name)
        if self.world.is_main and remove_state(path):
            self.log.event("remove", path=path)

    # -- what the loop asks for --------------------------------------------------------------

    def every(self, kind, number, epoch):
        """A step or epoch save (`number`: the step or the epoch), its state folder with
        --save_state, and the older ones --save_last_n_* (_state) let go, as kohya (not when
        the new one failed: the older one is then the newest there is)."""
        file_name, state_name, to_remove, keep_option, keep_state_option = _ROTATIONS[kind]
        args, saves = self.args, SaveGroup()
        keep = getattr(args, keep_option)
        stale = to_remove(args, number, keep)
        if self._save_lora(file_name(args, number), epoch, saves) and stale:
            self._remove_lora(file_name(args, stale))
        if args.save_state:
            stale = to_remove(args, number, getattr(args, keep_state_option) or keep)
            if self._save_state(state_name(args, number), epoch, saves) and stale:
                self._remove_state(state_name(args, stale))
        saves.raise_if_failed(self.progress.step)

    def interrupted(self, epoch):
        """After Ctrl-C / SIGTERM: this step's LoRA and, with --save_state, a state that
        --resume continues exactly; then the run ends with exit code 130."""
        args, saves, step = self.args, SaveGroup(), self.progress.step
        lora = self._save_lora(names.interrupted_name(args), epoch, saves)
        state = None
        if args.save_state or args.save_state_on_train_end:
            state = self._save_state(names.interrupted_state_name(args), epoch, saves)
        saves.raise_if_failed(step)
        then = (f" and the state {state}; continue with --resume {state}" if state else
                " (with --save_state it also saves a state folder that --resume continues)")
        raise Interrupted(f"stopped after step {step} of {args.max_train_steps}: saved "
                          f"{lora}{then}")

    def last(self, epoch):
        """The final LoRA (and state with --save_state / --save_state_on_train_end); its path."""
        saves = SaveGroup()
        if self.args.save_state or self.args.save_state_on_train_end:
            self._save_state(names.last_state_name(self.args), epoch, saves)
        final = self._save_lora(names.last_name(self.args), epoch, saves)
        saves.raise_if_failed(self.progress.step)
        return final

    def resume(self):
        """With --resume: the LoRA, optimizer state, progress and data position restored; the
        epoch to start at (1 without --resume). Call it before any step graph runs: a compiled
        function does not see host-side writes made after its first call."""
        if self.resume_record is None:
            return 1
        record = load_state(self.args.resume, self.trainable, self.apply_step)
        p = self.progress
        p.step, p.loss_sum, p.loss_count = record["current_step"], record["loss_sum"], record["loss_count"]
        self.loader.load_state_dict(record["data_position"])
        start_epoch = record["data_position"]["epoch"]
        self.log.resume_losses(p.step)
        self.log.event("resume", path=self.args.resume, step=p.step, epoch=start_epoch)
        logger.info(f"resumed from {self.args.resume}: step {p.step}, epoch {start_epoch}, "
                    f"batch {record['data_position']['batch']} of the epoch")
        return start_epoch
