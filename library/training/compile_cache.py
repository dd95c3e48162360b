"""A compile cache across runs: MindSpore's persistent compile cache, used where it is safe.

    cache = CompileCache.open(args, key_material)      # None with --no_compile_cache
    with cache.window() as window:                     # only the run's step graphs, in order
        seconds = grad_fn.compile(*signature); hit = window.after_graph()

What MindSpore 2.7.1 does (measured, tests/test_train_compile_cache.py pins each point):
- `set_context(enable_compile_cache=True, compile_cache_path=P)` stores every graph compiled while
  it is on as `P/rank_<r>/graph_cache/compile_cache_<N>.mindir`, where N counts the cached
  compiles of the process, and a later process loads entry N for its N-th cached compile. The
  entries are positional and the only validity check is a hash of the entry script and its
  imports: a changed option silently runs the old graph (constants such as the loss type, the
  noise options and the clipping norm are baked into it; Parameters are not, their values are
  live), other shapes or another order give garbage or a crash.
- The folder is fixed at the process's first cached compile; turning the cache off later does
  take effect.

So this module makes it safe by construction:
- one folder per hash of everything that shapes the graphs (`key_material`: MindSpore version and
  device, the project's source, the model config, dtypes, the step layout, the graph-shaping
  options, the trainable tensors and the ordered graph signatures), so a folder only ever sees
  one sequence of graphs;
- the cache is on only around the run's fixed-order compile of its step graphs before step 1
  (samples, validation and resumes compile with it off), once per process;
- a folder is used only when a finished marker says its entries were all written (a run killed
  mid-compile leaves entries without one, which the next run removes), under a file lock per
  rank, so two runs with the same key do not write it at the same time (the second waits, then
  loads).
"""

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil

logger = logging.getLogger("sdxl_train_network")

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The project's code that ends up in a graph (models, LoRA, step, losses, noise, optimizers).
_SOURCE_DIRS = ("library", "networks")

# Options that never reach a graph: where files go, what is logged and saved, the data and its
# order, the learning-rate values (an input tensor), the host-side schedule. Every other option
# is part of the key, so one that shapes a graph can only cost a miss, never a wrong hit.
HOST_ONLY_OPTIONS = frozenset("""
output_dir output_name logging_dir log_prefix log_with log_tracker_name log_tracker_config
log_config wandb_api_key wandb_run_name save_model_as save_precision save_every_n_epochs
save_every_n_steps save_n_epoch_ratio save_last_n_epochs save_last_n_steps
save_last_n_epochs_state save_last_n_steps_state save_state save_state_on_train_end
save_state_to_huggingface resume no_metadata training_comment metadata_title metadata_author
metadata_description metadata_license metadata_tags pretrained_model_name_or_path vae
network_weights dim_from_weights train_data_dir reg_data_dir dataset_config in_json
caption_extension caption_extention max_train_steps max_train_epochs learning_rate unet_lr
text_encoder_lr lr_scheduler lr_warmup_steps lr_decay_steps lr_scheduler_num_cycles
lr_scheduler_power lr_scheduler_timescale lr_scheduler_min_lr_ratio lr_scheduler_args
lr_scheduler_type max_data_loader_n_workers persistent_data_loader_workers sample_every_n_steps
sample_every_n_epochs sample_prompts sample_sampler sample_at_first validate_every_n_steps
validate_every_n_epochs max_validation_steps validation_seed validation_split config_file
output_config compile_cache_dir no_compile_cache compile_all_buckets_first console_log_level
console_log_file console_log_simple
""".split())
# Random ops in the graph (the LoRA dropouts) take their seed from ms.set_seed when the graph is
# built, so the seed is part of the key only when one of them is on.
_RANDOM_IN_GRAPH = ("network_dropout",)
_RANDOM_NETWORK_ARGS = ("rank_dropout", "module_dropout")


def default_dir():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sdxl_train_network", "compile")


def graph_options(args, net_kwargs):
    """The options of `args` that can reach a graph, as plain JSON values."""
    options = {k: v for k, v in sorted(vars(args).items()) if k not in HOST_ONLY_OPTIONS}
    random_in_graph = any(options.get(k) for k in _RANDOM_IN_GRAPH) or any(
        net_kwargs.get(k) not in (None, 0, 0.0, "0") for k in _RANDOM_NETWORK_ARGS)
    if not random_in_graph:
        options.pop("seed", None)
    return json.loads(json.dumps(options, default=str))


def source_hash(root=PROJECT_ROOT):
    """sha256 over the project's Python source (paths and contents)."""
    digest = hashlib.sha256()
    for top in _SOURCE_DIRS:
        for folder, dirs, files in os.walk(os.path.join(root, top)):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(f for f in files if f.endswith(".py")):
                path = os.path.join(folder, name)
                digest.update(os.path.relpath(path, root).encode())
                with open(path, "rb") as f:
                    digest.update(f.read())
    return digest.hexdigest()


def signature_of(tensors):
    """[[shape, -1 for an open axis; dtype], ...] of a graph's inputs."""
    return [[list(t.shape), str(t.dtype)] for t in tensors]


def _rank():
    from library.training import distributed
    return distributed.world().rank


_used_in_process = False     # MindSpore fixes the cache folder and its entry count per process


class CompileCache:
    """One cache folder (its key's), and the window during which MindSpore's cache is on."""

    def __init__(self, folder, key):
        self.folder = folder
        self.key = key
        self.entries = os.path.join(folder, f"rank_{_rank()}", "graph_cache")
        self.finished_marker = os.path.join(folder, f"finished_rank_{_rank()}.json")
        # per rank: msrun's ranks write their own entries and must not wait for each other
        self.lock = os.path.join(folder, f".lock_rank_{_rank()}")

    @classmethod
    def open(cls, args, key_material):
        """The cache for this run, or None (--no_compile_cache, or already used in this process:
        the reason is logged)."""
        if args.no_compile_cache:
            return None
        if _used_in_process:
            logger.info("compile cache off for this run: MindSpore allows one cache folder per "
                        "process and this process already used one")
            return None
        import mindspore as ms
        from library import device
        material = {"mindspore": ms.__version__, "device": device.device_target(),
                    "source": source_hash(), **key_material}
        key = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:32]
        root = args.compile_cache_dir or default_dir()
        folder = os.path.join(root, key)
        try:
            os.makedirs(folder, exist_ok=True)
            # what the folder's hash is of, for a reader; per-process temp name: two runs with
            # the same key may write it at once
            tmp = os.path.join(folder, f".key.json.{os.getpid()}.tmp")
            with open(tmp, "w") as f:
                json.dump(material, f, indent=1, sort_keys=True)
            os.replace(tmp, os.path.join(folder, "key.json"))
        except OSError as e:
            logger.warning(f"compile cache off: cannot write {folder} ({e.strerror}); set "
                           "--compile_cache_dir to a writable folder or pass --no_compile_cache")
            return None
        return cls(folder, key)

    @contextlib.contextmanager
    def window(self):
        """MindSpore's cache on, pointed at this folder, for the graphs compiled inside; a lock
        keeps another run with the same key out until the entries are complete."""
        global _used_in_process
        import mindspore as ms
        with open(self.lock, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            finished = os.path.exists(self.finished_marker)
            if not finished and os.path.isdir(self.entries):
                # entries without the marker: a run died while writing them
                shutil.rmtree(self.entries)
                logger.info(f"compile cache: removed the incomplete entries in {self.entries}")
            window = _Window(self.entries, finished)
            _used_in_process = True
            ms.set_context(enable_compile_cache=True, compile_cache_path=self.folder)
            try:
                yield window
            finally:
                ms.set_context(enable_compile_cache=False)
            if not finished:
                tmp = f"{self.finished_marker}.{os.getpid()}.tmp"
                with open(tmp, "w") as f:
                    json.dump({"graphs": window.count}, f)
                os.replace(tmp, self.finished_marker)


class _Window:
    """Counts the graphs compiled while the cache is on and tells hits from misses: the N-th
    graph is entry N; it was a hit when the entry existed before and MindSpore left it as it
    was (a miss writes it)."""

    def __init__(self, entries, finished):
        self.entries = entries
        self.finished = finished
        self.count = 0
        self.hits = 0
        self._before = None

    def _entry(self):
        return os.path.join(self.entries, f"compile_cache_{self.count}.mindir")

    def before_graph(self):
        path = self._entry()
        self._before = os.stat(path).st_mtime_ns if self.finished and os.path.exists(path) \
            else None

    def after_graph(self):
        """True when the graph just compiled came from the cache."""
        path = self._entry()
        hit = self._before is not None and os.path.exists(path) and \
            os.stat(path).st_mtime_ns == self._before
        self.count += 1
        self.hits += hit
        return hit


def cache_key_material(plan, training, grad_inputs, apply_inputs):
    """Everything besides MindSpore and the source that shapes the run's step graphs, in the
    order they are compiled."""
    from library.training import distributed
    grad_step = training.grad_step
    return {
        "model": training.models.config.to_dict(),
        "dtypes": [str(grad_step.weight_dtype), str(grad_step.vae_dtype),
                   str(grad_step.trainable[0].dtype)],
        "layout": grad_step.layout._asdict(),
        "options": graph_options(plan.args, plan.net_kwargs),
        "trainable": [[p.name, list(p.shape)] for p in grad_step.trainable],
        "world_size": distributed.world().size,
        "graphs": [signature_of(x) for x in grad_inputs] + [signature_of(apply_inputs)],
    }
