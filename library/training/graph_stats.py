"""What a compiled step graph computes: its operators by type, from MindSpore's own IR.

    counts = graph_op_counts(apply_step, lrs, accumulation)    # Counter({"Mul": 41, ...})

The Cell's `construct` is compiled (not run) by a fresh executor with ms.jit's default
configuration, and the nodes of the optimised graph (after inlining and loop unrolling, so one
node per kernel the graph launches, give or take the backend's fusions) are counted by operator
name. Nodes that only sequence side effects or pass values around (Load, UpdateState, Depend,
MakeTuple, TupleGetItem, Return) are not operators and are left out. bench/train_step.py reports
these counts; tests/test_train_step_graph.py checks that the apply step's do not grow with the
number of LoRA tensors.
"""

import re
import time
from collections import Counter

_BOOKKEEPING = {"Load", "UpdateState", "Depend", "MakeTuple", "TupleGetItem", "Return",
                "MakeList", "ListGetItem"}
# each node of the graph proto carries its full name once: <scope>/<Operator>-op<index>
_NODE = re.compile(rb"((?:Default|Gradients)[\w./-]*?/([A-Za-z][A-Za-z0-9_]*)-op\d+)")


def graph_op_counts(cell, *inputs):
    """Operator name -> node count of `cell.construct` compiled for these inputs."""
    from mindspore import JitConfig
    from library.training.compile import jit_api
    _JitExecutor = jit_api()._JitExecutor
    fn = cell.construct.__func__
    executor = _JitExecutor(fn, time.time_ns(), None, cell, JitConfig())
    phase = executor.compile(fn.__name__, *inputs)
    # MindIR holds every sub-graph (the branches of `if finite:` too); the "anf_ir" proto only
    # the top graph
    proto = executor._graph_executor.get_func_graph_proto(phase, "mind_ir")
    nodes = {full: op for full, op in _NODE.findall(proto)}
    return Counter(op.decode() for op in nodes.values() if op.decode() not in _BOOKKEEPING)
