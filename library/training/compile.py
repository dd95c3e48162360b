"""The step graphs: compiled once per input shape, counted and timed, optionally all before step 1.

    grad_fn, apply_fn = StepGraph(grad_step), StepGraph(apply_step)
    compiled = compile_ahead(grad_fn, apply_fn, representative_inputs(...), lrs, accumulation, log)

`StepGraph` runs a step Cell as `ms.jit(cell.construct)` (as the trainer always did) and adds
`compile(*inputs)`: build the graph for these input shapes without running it. Running is not an
option for compiling ahead: the apply step updates the weights and the optimizer state, and the
grad step adds into the gradient buffers (and, with LoRA dropout, draws random numbers).
MindSpore 2.7.1 has no public compile-only call for a jit function: `set_context(precompile_only=
True)` stops after the front end, and the next real call then fails ("Can't find run graph func";
tested). So `compile` drives the executor `ms.jit` itself uses (`mindspore.common.api._JitExecutor`)
with the same JitConfig: the graph lands in the same compile cache, keyed by the Cell and the
input shapes, and the first real call with those shapes runs it without compiling again
(tests/test_train_compile.py checks both).
"""

import logging
import time

logger = logging.getLogger("sdxl_train_network")

# ms.jit's default. O1 and STRICT syntax (fullgraph=True) gave the same losses but no clear
# compile-time gain on CPU (bench/compile_step.py; docs/training.md), so the default stays.
JIT_LEVEL = "O0"


def _jit_config(jit_level):
    """The JitConfig `ms.jit(fn, jit_level=jit_level)` builds (mindspore/common/api.py, 2.7.1)."""
    from mindspore.common.jit_config import JitConfig
    return JitConfig(jit_level=jit_level, exc_mode="auto", jit_syntax_level="LAX",
                     infer_boost="off", backend="", options="{}")


class StepGraph:
    """A step Cell run as one compiled graph per input shape."""

    def __init__(self, cell, jit_level=JIT_LEVEL):
        import mindspore as ms
        self.cell = cell
        self.jit_level = jit_level
        self._run = ms.jit(cell.construct, jit_level=jit_level)

    def __call__(self, *inputs):
        return self._run(*inputs)

    def compile(self, *inputs):
        """Compile for these inputs (shapes and dtypes; values are not read) without running.
        Returns the seconds it took."""
        from mindspore._c_expression.amp import get_curr_amp_strategy
        from mindspore.common._utils import get_func
        from mindspore.common.api import _JitExecutor
        fn = self.cell.construct.__func__
        # what ms.jit's wrapper sets before its first compile, so both compile the same graph
        if not hasattr(fn, "amp_strategy"):
            setattr(get_func(fn), "amp_strategy", get_curr_amp_strategy())
        start = time.time()
        executor = _JitExecutor(fn, time.time_ns(), None, self.cell, _jit_config(self.jit_level))
        executor.compile(fn.__name__, *inputs)
        return time.time() - start


class _Representatives:
    """A view of a DatasetGroup whose only epoch is one batch per distinct batch shape, so a
    BatchLoader yields exactly the batches whose shapes the run will compile for."""

    def __init__(self, group, batches):
        self.datasets = group.datasets
        self._batches = batches

    def epoch_batches(self, seed, epoch):
        return list(self._batches)

    def num_batches(self):
        return len(self._batches)


def batch_shapes(group, seed):
    """One (dataset_index, record_indices) per distinct batch shape: (bucket, batch length).

    Every epoch cuts the same buckets into the same batch lengths (only the order changes), so
    epoch 1 holds every shape of the run. A bucket whose size is not a multiple of batch_size
    gives two shapes: its full batches and its last, short one."""
    seen = {}
    for di, indices in group.epoch_batches(seed, 1):
        ds = group.datasets[di]
        key = (ds.records[indices[0]].bucket.bucket_wh, len(indices))
        seen.setdefault(key, (di, indices))
    return [seen[k] for k in sorted(seen)]


def representative_inputs(group, seed, loader_kwargs, assembler):
    """The step inputs of one real batch per distinct batch shape (decoded as training does)."""
    from library.data.loader import BatchLoader
    from library.training.loop import _to_tensors
    loader = BatchLoader(_Representatives(group, batch_shapes(group, seed)), seed, 0,
                         **loader_kwargs)
    try:
        return [_to_tensors(assembler(batch)[0]) for batch in loader.epoch(1)]
    finally:
        loader.close()


def compile_ahead(grad_fn, apply_fn, inputs, apply_inputs, log):
    """Compile the grad graph for every input shape and the apply graph, with a progress bar.

    Nothing runs, so no weight, optimizer state or gradient buffer changes. Returns
    {pixel input shape: seconds}, the train loop's record of compiled grad graphs."""
    from tqdm import tqdm
    compiled = {}
    with tqdm(total=len(inputs) + 1, desc="compiling step graphs", dynamic_ncols=True) as bar:
        for tensors in inputs:
            shape = tuple(tensors[0].shape)
            if shape in compiled:
                bar.update(1)
                continue
            compiled[shape] = grad_fn.compile(*tensors)
            log.event("compile", graph="grad_step", shape=list(shape), seconds=compiled[shape],
                      count=len(compiled), ahead=True)
            bar.update(1)
        seconds = apply_fn.compile(*apply_inputs)
        log.event("compile", graph="apply_step", seconds=seconds, ahead=True)
        bar.update(1)
    total = sum(compiled.values()) + seconds
    logger.info(f"compiled {len(compiled)} grad step graph(s) and the apply step in {total:.1f} s "
                f"before step 1")
    return compiled


def compile_run_ahead(plan, training, grad_fn, apply_fn, accumulation, log):
    """--compile_all_buckets_first: compile_ahead on the run's own batches and LR input."""
    import mindspore as ms
    inputs = representative_inputs(
        plan.train_group, plan.args.seed,
        dict(latent_cache=training.latent_cache, text_cache=training.text_cache),
        training.assembler)
    lrs = ms.Tensor(training.schedule.lrs(0))
    return compile_ahead(grad_fn, apply_fn, inputs, (lrs, accumulation), log)
