"""Data parallelism under `msrun`: one process per device, every process holding the whole
LoRA, each training on its own share of every epoch's batches, gradients averaged across
processes before clipping and the optimizer update, so all copies stay identical.

    msrun --worker_num=8 --local_worker_num=8 sdxl_train_network.py ...

    world = distributed.world()      # from msrun's environment; World(0, 1) without msrun
    world = distributed.init()       # communication up (mccl on CPU, hccl on Ascend)
    ApplyStep(..., grad_mean=distributed.gradient_mean(world))   # None for one process
    loss = distributed.mean_scalar(world, loss)                    # the logged loss, all ranks

msrun runs the script N + 1 times: once as its scheduler (MS_ROLE=MS_SCHED, see
serve_if_scheduler) and once per worker. It starts each worker with RANK_ID, RANK_SIZE and MS_WORKER_NUM (the group size),
MS_ROLE=MS_WORKER, MS_SCHED_HOST/PORT (the scheduler) and DEVICE_ID (the local device). Outside
msrun none is set and the run is a single process; nothing here then touches MindSpore's
communication, so a plain `python sdxl_train_network.py` behaves as before.

The gradient mean is an AllReduce(sum) per flat gradient buffer (one per parameter group, see
library.training.flat; not one per LoRA tensor) divided by the group size. It does not use
MindSpore's data-parallel context: on CPU that context reports device_num 1, and a
DistributedGradReducer built from it sums instead of averaging (reference/mindspore_probe.md).
On CPU, AllReduce takes float32 only; every collective here sends float32.
"""

import contextlib
import logging
import os

import mindspore as ms
import numpy as np
from mindspore import nn, ops

from library.errors import UserError
from library.training.world import World, world_from_env

logger = logging.getLogger("sdxl_train_network")


_world = None


def join_msrun_job():
    """The first thing a script started by msrun does. msrun runs the script N + 1 times: once
    as its scheduler (MS_ROLE=MS_SCHED), whose MindSpore init() serves the workers' rendezvous
    and does not return while the job runs (it must never train), and once per worker, which
    joins the job at once. A worker that failed before joining (a bad option, a missing file)
    would leave the scheduler waiting for it until msrun's --cluster_time_out (600 s); once
    joined, a failure stops the whole job within seconds. Errors after this point name the
    rank (report_failure)."""
    from library import device
    device.configure()
    if os.environ.get("MS_ROLE") == "MS_SCHED":
        from mindspore.communication import init as ms_init
        ms_init()
        raise SystemExit(0)    # the job is over if init ever returns here
    init()


def world():
    """This process's World: the initialised one after init(), else what msrun declares."""
    return _world or world_from_env(os.environ)


def init():
    """Bring up communication when running under msrun (idempotent), after the device target is
    set. Returns the World, checked against what MindSpore's communication reports."""
    global _world
    if _world is not None:
        return _world
    declared = world_from_env(os.environ)
    if os.environ.get("MS_ROLE") != "MS_WORKER":
        _world = declared
        return _world
    # under msrun even a group of one registers: msrun's scheduler waits for every worker
    from mindspore.communication import get_group_size, get_local_rank, get_rank
    from mindspore.communication import init as ms_init
    ms_init()
    actual = World(get_rank(), get_group_size(), get_local_rank())
    if (actual.rank, actual.size) != (declared.rank, declared.size):
        raise UserError(f"msrun declared rank {declared.rank} of {declared.size}, but "
                        f"communication reports rank {actual.rank} of {actual.size}")
    _world = actual
    return _world


def gradient_mean(world):
    """A Cell mapping a tuple of (flat) gradients to their mean over the group, or None for one
    process (then the step graph has no collective at all)."""
    if not world.distributed:
        return None
    return GradientMean(world.size)


_reduce_mean = ops.MultitypeFuncGraph("reduce_mean")


@_reduce_mean.register("Function", "Number", "Tensor")
def _reduce_mean_tensor(all_reduce, scale, grad):
    # the gradient buffers are float32, the only type the CPU AllReduce kernel takes
    return all_reduce(grad) * scale


class GradientMean(nn.Cell):
    """`construct(grads) -> grads`: AllReduce(sum) over the world group, times 1/size."""

    def __init__(self, size):
        super().__init__(auto_prefix=False)
        self.all_reduce = ops.AllReduce()
        self.scale = 1.0 / size
        self.hyper_map = ops.HyperMap()

    def construct(self, grads):
        return self.hyper_map(ops.partial(_reduce_mean, self.all_reduce, self.scale), grads)


def all_reduce_sum(world, array):
    """The element-wise sum of `array` (float32) over all ranks; `array` itself for one process."""
    array = np.asarray(array, np.float32)
    if not world.distributed:
        return array
    return ops.AllReduce()(ms.Tensor(array)).asnumpy()


def mean_scalar(world, value):
    """The mean of a float over all ranks (the logged loss)."""
    if not world.distributed:
        return float(value)
    return float(all_reduce_sum(world, np.array([value], np.float32))[0]) / world.size


def rank0_int(world, value):
    """Rank 0's value of a non-negative int below 2**32 (a random seed), on every rank. Sent as
    two 16-bit halves: a float32 holds integers exactly only up to 2**24."""
    if not world.distributed:
        return value
    halves = np.array([value >> 16, value & 0xFFFF] if world.is_main else [0, 0], np.float32)
    hi, lo = (int(x) for x in all_reduce_sum(world, halves))
    return (hi << 16) | lo


def fingerprint(params):
    """Per tensor: the sum, the sum of squares and a position-weighted sum of its values
    (float64 on the host, sent as float32): equal weights give equal fingerprints, and a
    difference anywhere in a tensor shows in at least one of them."""
    rows = []
    for p in params:
        x = np.asarray(p.asnumpy(), np.float64).ravel()
        weights = np.cos(np.arange(x.size, dtype=np.float64))
        rows.append((x.sum(), (x * x).sum(), (x * weights).sum()))
    return np.asarray(rows, np.float64).reshape(-1)


class ReplicasDiverged(UserError):
    """The ranks' copies of the LoRA differ: data parallelism is broken for this run."""


def check_replicas(world, params, step, log=None, tolerance=1e-6):
    """Check, on every rank at once, that all ranks hold the same trainable weights (called at
    each save: the rank-0 file then stands for every rank). Logs the largest relative
    difference between a rank and the group mean as a "replicas" event; raises
    ReplicasDiverged on every rank when it exceeds `tolerance`."""
    if not world.distributed:
        return 0.0
    local = fingerprint(params)
    mean = all_reduce_sum(world, local).astype(np.float64) / world.size
    scale = np.maximum(np.abs(mean), 1e-12)
    own = float(np.max(np.abs(local.astype(np.float32) - mean) / scale)) if local.size else 0.0
    # the largest deviation of any rank, known to all: the sum of each rank's own value is an
    # upper bound that is zero only when every rank matches
    spread = float(all_reduce_sum(world, np.array([own], np.float32))[0])
    if log is not None:
        log.event("replicas", step=step, ranks=world.size, max_relative_difference=spread)
    if spread > tolerance:
        raise ReplicasDiverged(f"at step {step} the {world.size} ranks hold different LoRA "
                               f"weights (relative difference {spread:.3g}): a rank ran other "
                               "code or data; the run stops instead of saving one rank's copy")
    return spread


@contextlib.contextmanager
def report_failure():
    """Under msrun, name the rank that failed before the error goes on (msrun itself only says
    "Distributed job exited with exception" and kills the other workers, which are waiting in
    their next collective)."""
    try:
        yield
    except BaseException as e:
        w = world()
        if w.distributed and not (isinstance(e, SystemExit) and not e.code):
            logger.error(f"rank {w.rank} of {w.size} stopped ({type(e).__name__}: {e}); msrun stops "
                         "the other ranks. Each rank's output is in msrun's --log_dir, "
                         f"worker_<rank>.log (this one: worker_{w.rank}.log)")
        raise
