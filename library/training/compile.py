"""The step graphs: compiled once per run (one graph for every batch shape), counted, timed, and
kept between runs by the compile cache.

    grad_fn, apply_fn, record = step_graphs(plan, training, accumulation, log)

By default the grad step's inputs are declared with their batch size and latent height and
width open (`Cell.set_inputs` with None dimensions, library.training.step.dynamic_signature), so
one graph runs every bucket and batch size of the run, short last batches included (a run whose
batches all have one shape gets a static graph: the same one compile, faster steps). Both
graphs are compiled before step 1, in a fixed order, which is what lets the compile cache
(library.training.compile_cache) serve them to a later run. `--static_shapes` keeps one grad
graph per batch shape, compiled at each shape's first batch, or all before step 1 with
`--compile_all_buckets_first` (the cache is used only then: the order is fixed).

`StepGraph` runs a step Cell as `ms.jit(cell.construct)` and adds `compile(*inputs)`: build the
graph for these inputs (shape-only tensors will do) without running it. Running is not an option
for compiling ahead: the apply step updates the weights and the optimizer state, and the grad
step adds into the gradient buffers (and, with LoRA dropout, draws random numbers). MindSpore
2.7.1 has no public compile-only call for a jit function: `set_context(precompile_only=True)`
stops after the front end and the next real call then fails ("Can't find run graph func"), and
the public `Cell.compile` belongs to graph mode's cell executor, whose graphs `ms.jit` does not
reuse. So `compile` drives the executor `ms.jit` itself uses (`mindspore.common.api._JitExecutor`,
a private API) with the same JitConfig: the graph lands in the same in-process cache, keyed by
the Cell and the input signature, and the first real call runs it without compiling again
(tests/test_train_compile.py pins this). `_JitExecutor`'s signature and the JitConfig `ms.jit`
builds are the same in 2.7.1 and 2.10.0; only the module moved (`jit_api`).
"""

import contextlib
import logging
import time

logger = logging.getLogger("sdxl_train_network")

# ms.jit's default. O1 and STRICT syntax (fullgraph=True) gave the same losses but no clear
# compile-time gain on CPU (bench/compile_step.py; docs/training.md), so the default stays.
JIT_LEVEL = "O0"


def jit_api():
    """The module of MindSpore's jit internals (`_JitExecutor`, `ms_compile_cache`).

    MindSpore 2.9 moved `mindspore.common.api` to `mindspore.graph.api`; the old name still
    imports (a copy of the new module's names) but logs a deprecation warning on import and is
    to be removed, so take the new one where it exists (2.10.0) and the old one before (2.7.1)."""
    try:
        from mindspore.graph import api
    except ImportError:
        from mindspore.common import api
    return api


def _jit_config(jit_level):
    """The JitConfig `ms.jit(fn, jit_level=jit_level)` builds (`jit` in mindspore/common/api.py
    in 2.7.1, mindspore/graph/api.py in 2.10.0: the same values in both)."""
    from mindspore import JitConfig
    return JitConfig(jit_level=jit_level, exc_mode="auto", jit_syntax_level="LAX",
                     infer_boost="off", backend="", options="{}")


class StepGraph:
    """A step Cell run as a compiled graph: one for every input shape when `signature` (shape-only
    tensors, None for an open dimension) is given, else one per input shape."""

    def __init__(self, cell, signature=None, jit_level=JIT_LEVEL):
        import mindspore as ms
        self.cell = cell
        self.jit_level = jit_level
        if signature is not None:
            cell.set_inputs(*signature)
        self._run = ms.jit(cell.construct, jit_level=jit_level)

    def __call__(self, *inputs):
        return self._run(*inputs)

    def compile(self, *inputs):
        """Compile for these inputs (shapes and dtypes; values are not read) without running.
        Returns the seconds it took."""
        from mindspore._c_expression.amp import get_curr_amp_strategy
        from mindspore.common._utils import get_func
        _JitExecutor = jit_api()._JitExecutor
        fn = self.cell.construct.__func__
        # what ms.jit's wrapper sets before its first compile, so both compile the same graph
        if not hasattr(fn, "amp_strategy"):
            setattr(get_func(fn), "amp_strategy", get_curr_amp_strategy())
        start = time.time()
        executor = _JitExecutor(fn, time.time_ns(), None, self.cell, _jit_config(self.jit_level))
        executor.compile(fn.__name__, *inputs)
        return time.time() - start


class CompileRecord:
    """The step graphs a run compiled: `compile` events in the step log, and the totals of the
    `end` event."""

    def __init__(self, log, dynamic):
        self.log = log
        self.dynamic = dynamic
        self.grad_shapes = set()     # static: the batch shapes compiled so far
        self.graphs = 0
        self.hits = 0
        self.seconds = 0.0
        self.grad_seconds = []       # per grad graph (--max_bucket_count's estimate)

    def covers(self, shape):
        """Whether a grad graph for this batch shape (pixels' shape) is compiled."""
        return (self.dynamic and self.graphs > 0) or shape in self.grad_shapes

    def add(self, graph, seconds, shape=None, ahead=False, cache="off"):
        self.graphs += 1
        self.hits += cache == "hit"
        self.seconds += seconds
        event = dict(graph=graph, seconds=seconds, count=self.graphs, ahead=ahead, cache=cache)
        if graph == "grad_step":
            self.grad_shapes.add(shape)
            self.grad_seconds.append(seconds)
            event["shape"] = list(shape)
        self.log.event("compile", **event)

    def totals(self):
        return dict(compiled_graphs=self.graphs, cache_hits=self.hits,
                    compile_seconds=round(self.seconds, 3))


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


def representative_inputs(group, seed, loader_kwargs, assembler, count=None):
    """The step inputs of one real batch per distinct batch shape (the first `count` of them),
    decoded as training does."""
    from library.data.loader import BatchLoader
    from library.training.batches import to_tensors
    loader = BatchLoader(_Representatives(group, batch_shapes(group, seed)[:count]), seed, 0,
                         **loader_kwargs)
    try:
        return [to_tensors(assembler(batch)[0]) for batch in loader.epoch(1)]
    finally:
        loader.close()


def compile_ahead(grad_fn, apply_fn, grad_inputs, apply_inputs, record, cache=None):
    """Compile the grad graph for each of `grad_inputs` (distinct signatures) and then the apply
    graph, in that order, with a progress bar; through `cache` (a CompileCache) when given.

    Nothing runs, so no weight, optimizer state or gradient buffer changes."""
    from tqdm import tqdm
    window = cache.window() if cache is not None else contextlib.nullcontext()
    graphs = [("grad_step", grad_fn, x) for x in grad_inputs] + [("apply_step", apply_fn,
                                                                   apply_inputs)]
    with window as entries, tqdm(total=len(graphs), desc="compiling step graphs",
                                 dynamic_ncols=True) as bar:
        for graph, fn, inputs in graphs:
            if entries is not None:
                entries.before_graph()
            seconds = fn.compile(*inputs)
            status = "off" if entries is None else ("hit" if entries.after_graph() else "miss")
            shape = tuple(inputs[0].shape) if graph == "grad_step" else None
            record.add(graph, seconds, shape, ahead=True, cache=status)
            bar.update(1)
    where = "" if cache is None else (f"; compile cache {cache.folder}: {record.hits} of "
                                      f"{record.graphs} graph(s) loaded from it")
    logger.info(f"compiled {len(grad_inputs)} grad step graph(s) and the apply step in "
                f"{record.seconds:.1f} s before step 1{where}")


def uses_dynamic_shapes(args, group):
    """One graph for every batch shape when the data has more than one (and no --static_shapes).
    With a single batch shape a static graph is the same one compile, and its steps are faster
    (a dynamic graph infers every kernel's shapes at each step: docs/training.md)."""
    return not args.static_shapes and len(batch_shapes(group, args.seed)) > 1


def step_graphs(plan, training, accumulation, log):
    """The run's grad and apply graphs, and the CompileRecord that counts their compiles.

    Both compiled now, through the compile cache: the dynamic grad graph (the default), or the
    static one of a run with a single batch shape, or every batch shape's with
    --static_shapes --compile_all_buckets_first. Otherwise (--static_shapes) at each shape's
    first batch."""
    import mindspore as ms
    from library.training.compile_cache import CompileCache, cache_key_material
    from library.training.step import dynamic_signature
    args = plan.args
    dynamic = uses_dynamic_shapes(args, plan.train_group)
    single = len(batch_shapes(plan.train_group, args.seed)) == 1
    record = CompileRecord(log, dynamic)
    training.grad_step.flat.compiled_writes = True     # the optimizer's layout (FlatLayout)
    apply_fn = StepGraph(training.apply_step)
    if not dynamic and not single and not args.compile_all_buckets_first:
        return StepGraph(training.grad_step), apply_fn, record
    inputs = representative_inputs(
        plan.train_group, args.seed,
        dict(latent_cache=training.latent_cache, text_cache=training.text_cache),
        training.assembler, count=1 if dynamic else None)
    if dynamic:
        inputs = [dynamic_signature(inputs[0], training.grad_step.layout)]
        grad_fn = StepGraph(training.grad_step, inputs[0])
    else:
        grad_fn = StepGraph(training.grad_step)
    apply_inputs = (ms.Tensor(training.schedule.lrs(0)), accumulation)
    cache = CompileCache.open(args, cache_key_material(plan, training, inputs, apply_inputs))
    compile_ahead(grad_fn, apply_fn, inputs, apply_inputs, record, cache)
    return grad_fn, apply_fn, record
