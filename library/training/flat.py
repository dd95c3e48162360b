"""The trainable parameters as a few flat float32 vectors: one per parameter group and dtype.

The gradient buffers, the optimizer state and the optimizer's arithmetic live in this form, so
the apply step runs a fixed number of kernels per group however many LoRA tensors there are:

    flat = FlatLayout(groups)       # groups: [ParamGroup(params, lr, description)]
    flat.flatten(grads)             # per-parameter tensors -> one float32 vector per segment
    flat.read()                     # the parameters' values, the same way
    flat.write(vectors)             # the new values back into the parameters, in their dtype

A segment is a run of consecutive parameters of one group with one dtype (every run of this
trainer has one dtype per group, so one segment per group). Inside a segment the parameters are
ordered by shape class (all tensors of one shape together, classes in order of first
appearance; `params` is that order) and each occupies [offset, offset + size) in row-major
order. A class is one Stack (read) or one Unstack (write) of a (count, *shape) block, so reading
and writing cost a few kernels per shape class (a LoRA has tens of shapes, against hundreds or
thousands of tensors), plus, when writing, one in-place copy per tensor: MindSpore 2.7.1 has no
Parameter that aliases part of another one (LoRA factors stored as slices of one flat Parameter
made the grad step several times slower, bench/flat_writeback.py). On this CPU the kernel
launches, not the arithmetic, dominate a LoRA's apply step, hence the classes.
"""

from typing import NamedTuple

import numpy as np
import mindspore as ms
from mindspore import nn, ops, Parameter, ParameterTuple, Tensor

F32 = ms.float32

_copy = ops.MultitypeFuncGraph("copy")


@_copy.register("Tensor", "Tensor")
def _copy_into(param, value):
    # copy_ (InplaceCopy), not ops.assign: bench/flat_writeback.py
    return param.copy_(value)


_assign = ops.MultitypeFuncGraph("assign")


@_assign.register("Tensor", "Tensor")
def _assign_into(param, value):
    return ops.assign(param, value)


class Segment(NamedTuple):
    name: str       # "group<i>" (".<k>" for a group's k-th run when a group mixes dtypes)
    group: int      # index of its ParamGroup (the position in the `lrs` input)
    dtype: object   # the parameters' dtype
    start: int      # its parameters are FlatLayout.params[start:stop]
    stop: int
    size: int       # number of values


class FlatLayout(nn.Cell):
    """Where each trainable parameter sits in its segment's flat vector (see the module doc)."""

    def __init__(self, groups):
        super().__init__(auto_prefix=False)
        # How `write` copies: assign (default) works op by op and compiled; copy_ is much faster
        # per tensor compiled (bench/flat_writeback.py), so whoever compiles the optimizer's
        # step sets this first (compile.step_graphs). Not op by op: there MindSpore 2.10 makes
        # a slice at offset 0 a view that keeps the whole vector's storage, and its CPU copy_
        # kernel refuses a source larger than the parameter.
        self.compiled_writes = False
        params, segments, classes = [], [], []
        for gi, group in enumerate(groups):
            runs = []
            for p in group.params:
                if not runs or runs[-1][-1].dtype != p.dtype:
                    runs.append([])
                runs[-1].append(p)
            for k, run in enumerate(runs):
                by_shape = {}
                for p in run:
                    by_shape.setdefault(tuple(p.shape), []).append(p)
                start, offset, segment_classes = len(params), 0, []
                for shape, members in by_shape.items():
                    n = int(np.prod(shape))
                    # first, stop in params; offset, length in the vector; the shape
                    segment_classes.append((len(params), len(params) + len(members), offset,
                                            n * len(members), shape))
                    params.extend(members)
                    offset += n * len(members)
                name = f"group{gi}" if len(runs) == 1 else f"group{gi}.{k}"
                segments.append(Segment(name, gi, run[0].dtype, start, len(params), offset))
                classes.append(tuple(segment_classes))
        if not params:
            raise ValueError("the optimizer got no parameters")
        self.params = ParameterTuple(params)
        self.segments = tuple(segments)
        # plain tuples of ints: graph mode unrolls the loops over them as constants
        self.classes = tuple(classes)
        self.dtypes = tuple(s.dtype for s in segments)
        self.shapes = tuple(tuple(p.shape) for p in params)
        self.concat = ops.Concat(0)
        self.stack = ops.Stack(0)
        self.unstack = ops.Unstack(0)
        self.hyper_map = ops.HyperMap()

    def zeros(self, prefix):
        """One zero float32 Parameter per segment, named `<prefix>.<segment name>`."""
        return ParameterTuple(Parameter(Tensor(np.zeros(s.size, np.float32)),
                                        name=f"{prefix}.{s.name}", requires_grad=False)
                              for s in self.segments)

    def initial(self, prefix):
        """Like `zeros`, holding the parameters' current values (read on the host)."""
        return ParameterTuple(Parameter(Tensor(np.concatenate(
            [p.asnumpy().astype(np.float32).reshape(-1) for p in self.params[s.start:s.stop]])),
            name=f"{prefix}.{s.name}", requires_grad=False) for s in self.segments)

    def flatten(self, tensors):
        """A tuple of per-parameter tensors (in `params` order) -> one float32 vector per segment."""
        out = ()
        for k in range(len(self.classes)):
            parts = ()
            for c in range(len(self.classes[k])):
                first, stop = self.classes[k][c][0], self.classes[k][c][1]
                parts = parts + (self.stack(tensors[first:stop]).reshape(-1),)
            # one cast per segment (full_fp16 parameters), not one per tensor
            out = out + (ops.cast(self.concat(parts), F32),)
        return out

    def read(self):
        return self.flatten(self.params)

    def write(self, vectors):
        """Copy each segment's float32 vector into its parameters (cast to their dtype first)."""
        for k in range(len(self.classes)):
            vector = ops.cast(vectors[k], self.dtypes[k])
            for c in range(len(self.classes[k])):
                first, stop, offset, length, shape = self.classes[k][c]
                # ops.slice, not vector[a:b]: on CPU that StridedSlice took time in proportion
                # to the whole vector (7.4 ms a call on 5.7 M values; MindSpore's profiler)
                block = ops.slice(vector, (offset,), (length,)).reshape((stop - first,) + shape)
                if self.compiled_writes:
                    self.hyper_map(_copy, self.params[first:stop], self.unstack(block))
                else:
                    self.hyper_map(_assign, self.params[first:stop], self.unstack(block))
        return vectors

    def description(self):
        """JSON-safe: each segment's name, group, dtype and parameter names in order (stored with
        a training state, so a resume can check that the flat state means the same thing)."""
        return [{"name": s.name, "group": s.group, "dtype": str(s.dtype),
                 "params": [p.name for p in self.params[s.start:s.stop]]} for s in self.segments]
