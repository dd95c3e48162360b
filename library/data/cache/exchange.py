"""The data-parallel share of the cache work (package docstring, "Data parallel"): which rank
encodes what, and an exchange that gives every rank every array through an AllReduce(sum)."""

import numpy as np


class SingleProcess:
    """The `share` of a run on one process. A data-parallel run passes an object with the same
    attributes (rank, size, local_rank) and all_reduce_sum(float32 array) -> the sum over ranks
    (library.training.cache_encoders.RankShare)."""
    rank, size, local_rank = 0, 1, 0

    @staticmethod
    def all_reduce_sum(array):
        return np.asarray(array, np.float32)


MAX_DIMS = 8


def exchange(share, owner, arrays, count):
    """Rank `owner`'s `count` float32 arrays, on every rank (`arrays` is ignored elsewhere):
    each array's shape, then its values, through an AllReduce(sum) where the others add zeros."""
    if share.size == 1:
        return [np.asarray(a, np.float32) for a in arrays]
    mine = share.rank == owner
    out = []
    for i in range(count):
        header = np.zeros(MAX_DIMS + 1, np.float32)
        if mine:
            a = np.ascontiguousarray(arrays[i], np.float32)
            header[0], header[1:1 + a.ndim] = a.ndim, a.shape
        header = share.all_reduce_sum(header)
        shape = tuple(int(d) for d in header[1:1 + int(header[0])])
        out.append(share.all_reduce_sum(a if mine else np.zeros(shape, np.float32)).reshape(shape))
    return out


def agree_on_hits(share, todo, hit_ids):
    """Drop from `todo` the entries valid on disk on every rank; returns how many were dropped.
    All ranks then compute the same list (a node with a stale file recomputes for everyone)."""
    misses = np.array([0.0 if eid in hit_ids else 1.0 for eid in todo], np.float32)
    if share.size > 1 and len(misses):
        misses = share.all_reduce_sum(misses)
    hits = [eid for eid, m in zip(list(todo), misses) if m == 0]
    for eid in hits:
        del todo[eid]
    return len(hits)


def barrier(share):
    if share.size > 1:
        share.all_reduce_sum(np.zeros(1, np.float32))
