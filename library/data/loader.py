"""Batches of samples for training, decoded in worker processes, with a resumable position.

    loader = BatchLoader(train_group, seed=args.seed, num_workers=args.max_data_loader_n_workers)
    loader.load_state_dict(saved)                # optional: resume inside an epoch
    for batch in loader.epoch(epoch):            # batch: list of sample dicts (examples.load_sample),
                                                 # "image" as float32 CHW in [-1, 1]
        ...
        saved = loader.state_dict()              # {"seed", "epoch", "batch"}: the next batch to yield

Data parallel (msrun): with `rank` and `world_size`, a loader yields only its rank's share of
each epoch's global batch list (see `shard_positions`); a sample's randomness and its batch's
noise key follow the batch's global position, so a batch is the same on whichever rank runs it.

Workers are spawned processes (not forked: the trainer's process holds MindSpore threads) that
return numpy arrays only. Because every sample's randomness comes from its own seeded RNG, the
batches are identical with 0, 1 or N workers.
"""

import collections
import multiprocessing
import os
import signal

from library.data.examples import load_sample, sample_rng
from library.data.images import to_chw_float
from library.errors import UserError


def _load_batch(task, latent_cache=None):
    """Worker entry point: decode one batch. Top-level so that it pickles."""
    records, config, seed, epoch, batch_index, step, max_train_steps = task
    return [load_sample(rec, config, sample_rng(seed, epoch, batch_index, slot), epoch, step, max_train_steps,
                        latent_cache)
            for slot, rec in enumerate(records)]


def _ignore_sigint():
    # Ctrl-C in a terminal reaches the whole process group: the workers leave it to the main
    # process, which stops after the current step and saves (library.training.interrupts);
    # a worker killed by it would leave its batch unfinished and the main process waiting.
    # (SIGTERM stays default: Pool.terminate stops the workers with it.)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def batches_per_rank(num_batches, world_size):
    """How many batches each rank runs per epoch: the global count padded to a multiple of the
    world size (see shard_positions)."""
    return -(-num_batches // world_size)


def shard_positions(num_batches, rank, world_size, start=0):
    """The global positions of `rank`'s batches in an epoch of `num_batches` batches, from the
    round that begins at position `start` (a multiple of world_size).

    Position p goes to rank p % world_size (accelerate's round-robin sharding of batches). When
    the count does not divide, the list is padded to a multiple of the world size by repeating
    the epoch's first batches (accelerate's even_batches, which kohya runs with): position p
    stands for batch p % num_batches. So every rank takes the same number of steps, and a run
    on one process is the plain list.
    """
    total = batches_per_rank(num_batches, world_size) * world_size
    return list(range(start + rank, total, world_size))


class BatchLoader:
    """Iterates a DatasetGroup's batches epoch by epoch.

    num_workers: decoding processes, capped at the CPU count like kohya; 0 decodes in-process.
    persistent: keep the worker pool between epochs (kohya's --persistent_data_loader_workers).
    max_train_steps: for token warmup given as a fraction. Each epoch's step numbers start at
    `first_step` and advance every `batches_per_step` batches (gradient accumulation).
    latent_cache: a library.data.cache.latents.LatentCache; samples then carry `latents` instead of an
    image and are made in this process (nothing to decode, so no workers are used).
    text_cache: a TextCache; samples then also carry `text_context` (L, C) and `text_pooled` (P).
    rank, world_size: this process's share of the batches under data parallelism.
    """

    def __init__(self, group, seed, num_workers=0, persistent=False, max_train_steps=0, prefetch_per_worker=2,
                 latent_cache=None, text_cache=None, rank=0, world_size=1):
        if num_workers < 0:
            raise UserError(f"--max_data_loader_n_workers {num_workers} must be 0 or more")
        self.group = group
        self.seed = seed
        self.num_workers = min(num_workers, os.cpu_count() or 1)
        self.persistent = persistent
        self.max_train_steps = max_train_steps
        self.latent_cache = latent_cache
        self.text_cache = text_cache
        self.rank, self.world_size = rank, world_size
        self.prefetch = max(1, self.num_workers * prefetch_per_worker)
        self._pool = None
        self._resume = None        # (epoch, batch) set by load_state_dict
        self._position = {"seed": seed, "epoch": 1, "batch": 0}

    def __len__(self):
        """Batches this rank runs per epoch."""
        return batches_per_rank(self.group.num_batches(), self.world_size)

    def state_dict(self):
        """The position of the next batch: {"seed", "epoch", "batch"} (plain ints, JSON-safe).
        Under data parallelism "batch" is the global position where the next round of batches
        (one per rank) starts, the same on every rank."""
        return dict(self._position)

    def load_state_dict(self, state):
        """Resume at a saved position: the next `epoch(state["epoch"])` starts at its batch."""
        if state["seed"] != self.seed:
            raise UserError(f"the saved data position was made with seed {state['seed']}, this run uses {self.seed}; "
                            f"resume with the same --seed")
        self._resume = (state["epoch"], state["batch"])
        self._position = dict(state)

    def _tasks(self, epoch, start, first_step, batches_per_step):
        batches = self.group.epoch_batches(self.seed, epoch)
        for index in shard_positions(len(batches), self.rank, self.world_size, start):
            di, record_indices = batches[index % len(batches)]
            ds = self.group.datasets[di]
            records = [ds.records[i] for i in record_indices]
            step = first_step + (index // self.world_size) // batches_per_step
            yield index, (records, ds.config, self.seed, epoch, index, step, self.max_train_steps)

    def epoch(self, epoch, first_step=0, batches_per_step=1):
        """Yield the batches of `epoch` (1-based, as kohya counts), from the resume point if one
        was loaded for this epoch."""
        start = 0
        if self._resume is not None and self._resume[0] == epoch:
            start = self._resume[1]
        self._resume = None
        tasks = self._tasks(epoch, start, first_step, batches_per_step)
        if self.num_workers == 0 or self.latent_cache is not None:
            results = ((index, _load_batch(task, self.latent_cache)) for index, task in tasks)
        else:
            results = self._parallel(tasks)
        try:
            for index, batch in results:
                for sample in batch:
                    sample["batch_key"] = (epoch, index)     # seeds the batch's noise draws
                    if sample["image"] is not None:
                        sample["image"] = to_chw_float(sample["image"])
                    if self.text_cache is not None:
                        sample["text_context"], sample["text_pooled"] = self.text_cache.get_caption(
                            sample["path"], sample["caption"])
                self._position = {"seed": self.seed, "epoch": epoch,
                                  "batch": index - self.rank + self.world_size}
                yield batch
            self._position = {"seed": self.seed, "epoch": epoch + 1, "batch": 0}
        finally:
            if not self.persistent:
                self.close()

    def _parallel(self, tasks):
        """Ordered results with at most `prefetch` batches in flight, so memory stays bounded."""
        if self._pool is None:
            self._pool = multiprocessing.get_context("spawn").Pool(
                self.num_workers, initializer=_ignore_sigint)
        pending = collections.deque()
        for index, task in tasks:
            pending.append((index, self._pool.apply_async(_load_batch, (task,))))
            if len(pending) >= self.prefetch:
                done_index, result = pending.popleft()
                yield done_index, result.get()
        while pending:
            done_index, result = pending.popleft()
            yield done_index, result.get()

    def close(self):
        """Stop the worker processes (also done at the end of each epoch unless persistent)."""
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None
