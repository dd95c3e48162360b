"""Benchmark: ways to get a flat vector's values into (and out of) many LoRA Parameters, as a table.

    PYTHONPATH=. .venv/bin/python bench/flat_writeback.py [--tensors 400] [--width 1280] [--steps 10]
                                                          [--skip-views]

The flat optimizers (library/training/flat.py) compute new values for a whole parameter group
in one float32 vector; these must reach the LoRA Parameters that the UNet reads. Each row is
one way, compiled alone with ms.jit on CPU, for --tensors alternating (8, width) / (width, 8)
tensors (rank-8 LoRA factors of a --width wide layer): compile time, median run time, and
whether the Parameters hold the right values afterwards.

- write, copy_ / ops.assign / assign_add: cut the vector per tensor (`vector[a:b]`, a
  StridedSlice, or `ops.slice`) and write it in place, the per-tensor work expanded by HyperMap;
- write, by shape class: the tensors are laid out by shape, each class's block is cut by one
  Slice and one Unstack, then one copy_ per tensor (what FlatLayout.write does).
  The vector is computed inside the graph (input × 1), as the optimizer's result is;
- read, loop / HyperMap / by shape class: reshape every Parameter and concatenate, or one Stack
  per shape class (FlatLayout.read);
- LoRA factors as views: the forward of a chain of LoRA branches with gradients, once with a
  Parameter per factor (gradients concatenated into one flat buffer, as GradStep does) and once
  with every factor sliced from one flat Parameter, so nothing needs writing back. MindSpore
  2.7.1 has no Parameter aliasing part of another, and SplitV (cutting a vector into pieces of
  different sizes in one kernel) has no CPU kernel, so slicing is the only way to get views.
"""

import argparse
import statistics
import time

import numpy as np
import mindspore as ms
from mindspore import nn, ops, Parameter, ParameterTuple, Tensor

RANK = 8

_flat = ops.MultitypeFuncGraph("flat")
_writes = {how: ops.MultitypeFuncGraph(f"write_{i}") for i, how in enumerate(
    ("copy_, vector[a:b]", "copy_, ops.slice", "ops.assign, ops.slice", "assign_add, ops.slice"))}


@_writes["copy_, vector[a:b]"].register("Tensor", "Tensor", "Number", "Number", "Tuple")
def _write_copy_index(vector, param, start, end, shape):
    return param.copy_(vector[start:end].reshape(shape))


@_writes["copy_, ops.slice"].register("Tensor", "Tensor", "Number", "Number", "Tuple")
def _write_copy_slice(vector, param, start, end, shape):
    return param.copy_(ops.slice(vector, (start,), (end - start,)).reshape(shape))


@_writes["ops.assign, ops.slice"].register("Tensor", "Tensor", "Number", "Number", "Tuple")
def _write_assign(vector, param, start, end, shape):
    return ops.assign(param, ops.slice(vector, (start,), (end - start,)).reshape(shape))


@_writes["assign_add, ops.slice"].register("Tensor", "Tensor", "Number", "Number", "Tuple")
def _write_assign_add(vector, param, start, end, shape):
    return ops.assign_add(param, ops.slice(vector, (start,), (end - start,)).reshape(shape) - param)


@_flat.register("Tensor")
def _flat_tensor(tensor):
    return tensor.reshape(-1)


_copy_value = ops.MultitypeFuncGraph("copy_value")


@_copy_value.register("Tensor", "Tensor")
def _copy_value_into(param, value):
    return param.copy_(value)


class Layout:
    def __init__(self, n, width):
        self.width = width
        self.shapes = tuple((RANK, width) if i % 2 == 0 else (width, RANK) for i in range(n))
        ends = np.cumsum([int(np.prod(s)) for s in self.shapes])
        self.starts, self.ends = tuple(int(x) for x in ends - ends[0]), tuple(int(x) for x in ends)
        self.size = int(ends[-1])


class Write(nn.Cell):
    def __init__(self, layout, how):
        super().__init__()
        self.how, self.shapes, self.starts, self.ends = how, layout.shapes, layout.starts, layout.ends
        self.width = layout.width
        self.params = ParameterTuple(Parameter(Tensor(np.zeros(s, np.float32)), name=f"{how}{i}")
                                     for i, s in enumerate(layout.shapes))
        self.hyper_map, self.unstack = ops.HyperMap(), ops.Unstack(0)

    def construct(self, vector, one):
        vector = vector * one
        if self.how == "by shape class":
            # the even tensors (one shape) first, then the odd ones, as FlatLayout orders them
            half = len(self.shapes) // 2
            n = RANK * self.width
            for c in range(2):
                block = ops.slice(vector, (c * half * n,), (half * n,)).reshape(
                    (half,) + self.shapes[c])
                self.hyper_map(_copy_value, self.params[c::2], self.unstack(block))
            return vector
        self.hyper_map(ops.partial(_writes[self.how], vector), self.params, self.starts, self.ends,
                       self.shapes)
        return vector


class Read(nn.Cell):
    def __init__(self, layout, how):
        super().__init__()
        self.how, self.n = how, len(layout.shapes)
        self.params = ParameterTuple(
            Parameter(Tensor(np.arange(s, e, dtype=np.float32).reshape(shape)), name=f"r{how}{i}")
            for i, (s, e, shape) in enumerate(zip(layout.starts, layout.ends, layout.shapes)))
        self.concat, self.hyper_map, self.stack = ops.Concat(0), ops.HyperMap(), ops.Stack(0)

    def construct(self, vector, one):
        if self.how == "by shape class":
            return self.concat((self.stack(self.params[0::2]).reshape(-1),
                                self.stack(self.params[1::2]).reshape(-1))) + vector
        if self.how == "HyperMap":
            return self.concat(self.hyper_map(_flat, self.params)) + vector
        parts = ()
        for i in range(self.n):
            parts = parts + (self.params[i].reshape(-1),)
        return self.concat(parts) + vector


class Chain(nn.Cell):
    """h += (h @ down.T) @ up.T per LoRA pair; grads into one flat buffer."""

    def __init__(self, layout, views):
        super().__init__()
        self.views, self.shapes, self.starts, self.ends = views, layout.shapes, layout.starts, layout.ends
        rng = np.random.default_rng(0)
        values = (rng.standard_normal(layout.size) * 0.01).astype(np.float32)
        if views:
            self.flat = Parameter(Tensor(values), name="chain_flat")
            self.weights = ParameterTuple((self.flat,))
        else:
            self.weights = ParameterTuple(
                Parameter(Tensor(values[s:e].reshape(shape)), name=f"chain{i}")
                for i, (s, e, shape) in enumerate(zip(self.starts, self.ends, self.shapes)))
        self.buffer = Parameter(Tensor(np.zeros(layout.size, np.float32)), name=f"chain_buf{views}")
        self.grad = ms.value_and_grad(self.loss, None, self.weights)
        self.concat, self.hyper_map = ops.Concat(0), ops.HyperMap()

    def factor(self, i):
        if self.views:
            return self.flat[self.starts[i]:self.ends[i]].reshape(self.shapes[i])
        return self.weights[i]

    def loss(self, x):
        h = x
        for j in range(len(self.shapes) // 2):
            h = h + ops.matmul(ops.matmul(h, self.factor(2 * j).T), self.factor(2 * j + 1).T)
        return (h * h).mean()

    def construct(self, x, one):
        loss, grads = self.grad(x * one)
        flat = grads[0] if self.views else self.concat(self.hyper_map(_flat, grads))
        ops.assign_add(self.buffer, flat)
        return loss


ONE = Tensor(1.0, ms.float32)


def measure(cell, x, steps, check):
    run = ms.jit(cell.construct)
    t0 = time.perf_counter()
    run(x, ONE)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = run(x, ONE)
        out.asnumpy()
        check_value = check()      # also waits for the graph's writes
        times.append(time.perf_counter() - t0)
    return compile_s, statistics.median(times), check_value


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tensors", type=int, default=400)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--skip-views", action="store_true", help="skip the (slow) LoRA-view rows")
    args = ap.parse_args()
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    layout = Layout(args.tensors, args.width)
    vector = Tensor(np.arange(layout.size, dtype=np.float32))
    expected = np.arange(layout.size, dtype=np.float32)
    print(f"{args.tensors} tensors, {layout.size:,} values; median of {args.steps} runs\n")
    print("| what | compile (s) | run (ms) | values right |")
    print("|---|---|---|---|")
    for how in (*_writes, "by shape class"):
        cell = Write(layout, how)
        # where each tensor's values are in the vector: in order, or by shape class
        order = list(range(0, len(layout.shapes), 2)) + list(range(1, len(layout.shapes), 2)) \
            if how == "by shape class" else list(range(len(layout.shapes)))
        n = RANK * layout.width
        c, t, ok = measure(cell, vector, args.steps, lambda: all(
            np.array_equal(cell.params[i].asnumpy().ravel(), expected[q * n:(q + 1) * n])
            for q, i in enumerate(order)))
        print(f"| write, {how} | {c:.1f} | {1000 * t:.1f} | {ok} |", flush=True)
    by_class = np.concatenate([expected[s:e] for parity in (0, 1)
                               for s, e in list(zip(layout.starts, layout.ends))[parity::2]])
    for how in ("loop", "HyperMap", "by shape class"):
        cell = Read(layout, how)
        c, t, _ = measure(cell, vector, args.steps, lambda: None)
        want = by_class if how == "by shape class" else expected
        ok = np.array_equal(ms.jit(cell.construct)(vector * 0, ONE).asnumpy(), want)
        print(f"| read, {how} | {c:.1f} | {1000 * t:.1f} | {ok} |", flush=True)
    if args.skip_views:
        return
    x = Tensor(np.random.default_rng(1).standard_normal((1, 64, args.width)).astype(np.float32))
    grads = {}
    for views in (False, True):
        cell = Chain(layout, views)
        c, t, _ = measure(cell, x, args.steps, lambda: None)
        grads[views] = cell.buffer.asnumpy() / (args.steps + 1)
        name = "one flat Parameter, factors sliced" if views else "a Parameter per factor"
        print(f"| grad step, LoRA as {name} | {c:.1f} | {1000 * t:.1f} | – |", flush=True)
    scale = np.abs(grads[False]).max()
    print(f"\nlargest gradient difference between the two grad steps: "
          f"{np.abs(grads[True] - grads[False]).max() / scale:.2e} of the largest gradient")


if __name__ == "__main__":
    main()
