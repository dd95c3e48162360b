"""The trainable parameters as a few flat float32 vectors: one per parameter group and dtype.

The gradient buffers, the optimizer state and the optimizer's arithmetic live in this form, so
the apply step runs a handful of kernels per group however many LoRA tensors there are:

    flat = FlatLayout(groups)       # groups: [ParamGroup(params, lr, description)]
    flat.flatten(grads)             # per-parameter tensors -> one float32 vector per segment
    flat.read()                     # the parameters' values, the same way
    flat.write(vectors)             # the new values back into the parameters, in their dtype

A segment is a run of consecutive parameters of one group with one dtype (every run of this
trainer has one dtype per group, so one segment per group); the parameter order is the groups'
order, unchanged. Inside a segment each parameter occupies [offset, offset + size) in row-major
order, as `reshape(-1)` lays it out.

Only `write` needs one kernel per tensor (a slice and an in-place copy): MindSpore 2.7.1 has no
Parameter that aliases part of another one, and on CPU it has no kernel for SplitV, the one
primitive that cuts a vector into pieces of different sizes. `Tensor.copy_` is used for every
Parameter write of the apply step, because `ops.assign` costs about 25x more per call on CPU
(400 LoRA-sized writes: 19 ms with copy_, 574 ms with assign; bench/flat_writeback.py).
"""

from typing import NamedTuple

import numpy as np
import mindspore as ms
from mindspore import nn, ops, Parameter, ParameterTuple, Tensor

F32 = ms.float32

# Per-tensor work goes through HyperMap, which graph mode expands in C++: compiling the reshapes
# and the concat of 400 tensors took 0.9 s this way and 31 s as an unrolled Python loop, the
# write-back 12 s against 38 s (bench/flat_writeback.py).
_flat = ops.MultitypeFuncGraph("flat")
_write = ops.MultitypeFuncGraph("write")


@_flat.register("Tensor")
def _flat_tensor(tensor):
    return tensor.reshape(-1)


@_write.register("Tensor", "Tensor", "Number", "Number", "Tuple")
def _write_tensor(vector, param, start, end, shape):
    # ops.slice, not vector[start:end]: on CPU the StridedSlice kernel that indexing compiles to
    # costs time in proportion to the whole vector (7.4 ms a call on a 5.7M-value segment, 80%
    # of the apply step, MindSpore's profiler), Slice in proportion to the piece
    return param.copy_(ops.slice(vector, (start,), (end - start,)).reshape(shape))


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
        params, segments = [], []
        for gi, group in enumerate(groups):
            runs = []
            for p in group.params:
                if not runs or runs[-1][-1].dtype != p.dtype:
                    runs.append([])
                runs[-1].append(p)
            for k, run in enumerate(runs):
                size = sum(int(np.prod(p.shape)) for p in run)
                name = f"group{gi}" if len(runs) == 1 else f"group{gi}.{k}"
                segments.append(Segment(name, gi, run[0].dtype, len(params), len(params) + len(run),
                                        size))
                params.extend(run)
        if not params:
            raise ValueError("the optimizer got no parameters")
        self.params = ParameterTuple(params)
        self.segments = tuple(segments)
        # plain tuples of ints: graph mode unrolls the loops over them as constants
        self.bounds = tuple((s.start, s.stop) for s in segments)
        self.dtypes = tuple(s.dtype for s in segments)
        self.shapes = tuple(tuple(p.shape) for p in params)
        offsets = []
        for s in segments:
            offset = 0
            for p in params[s.start:s.stop]:
                offsets.append(offset)
                offset += int(np.prod(p.shape))
        self.offsets = tuple(offsets)
        self.ends = tuple(o + int(np.prod(s)) for o, s in zip(offsets, self.shapes))
        self.concat = ops.Concat(0)
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
        for k in range(len(self.bounds)):
            start, stop = self.bounds[k]
            # one cast per segment (full_fp16 parameters), not one per tensor
            out = out + (ops.cast(self.concat(self.hyper_map(_flat, tensors[start:stop])), F32),)
        return out

    def read(self):
        return self.flatten(self.params)

    def write(self, vectors):
        """Copy each segment's float32 vector into its parameters (cast to their dtype first)."""
        for k in range(len(self.bounds)):
            start, stop = self.bounds[k]
            self.hyper_map(ops.partial(_write, ops.cast(vectors[k], self.dtypes[k])),
                           self.params[start:stop], self.offsets[start:stop],
                           self.ends[start:stop], self.shapes[start:stop])
        return vectors

    def description(self):
        """JSON-safe: each segment's name, group, dtype and parameter names in order (stored with
        a training state, so a resume can check that the flat state means the same thing)."""
        return [{"name": s.name, "group": s.group, "dtype": str(s.dtype),
                 "params": [p.name for p in self.params[s.start:s.stop]]} for s in self.segments]
