"""The apply step's compiled graph does not grow with the number of LoRA tensors.

The same ApplyStep (two parameter groups, clipping on) is compiled for 50 and for 400
LoRA-shaped tensors (two shapes) and its operators counted (library.training.graph_stats).
Everything the step computes (division, norm, clipping, the optimizer's update, the fp16 check
and scale, zeroing, reading the parameters and cutting the result into them by shape class)
must occur equally often; the only operator allowed to grow is the in-place copy into each LoRA
Parameter, exactly once per extra tensor, for which MindSpore 2.7.1 offers no batched form
(library/training/flat.py).
"""

import numpy as np
import pytest
import mindspore as ms
from mindspore import Parameter, Tensor

from library.training.graph_stats import graph_op_counts
from library.training.grad_ops import DynamicLossScaler
from library.training.optimizer_options import build_optimizer
from library.training.optimizer_cells import ParamGroup
from library.training.step import ApplyStep

PER_TENSOR = {"InplaceCopy": 1}


def apply_step(tensors, optimizer, fp16, tag):
    rng = np.random.default_rng(0)
    params = [Parameter(Tensor(rng.standard_normal((4, 32) if i % 2 == 0 else (32, 4))
                               .astype(np.float32)), name=f"{tag}.m{i // 2}.{'down' if i % 2 == 0 else 'up'}")
              for i in range(tensors)]
    groups = [ParamGroup(params[:tensors // 2], 1.0, "te"), ParamGroup(params[tensors // 2:], 1.0, "unet")]
    built = build_optimizer(groups, 1.0, optimizer, [],
                            lr_scheduler="adafactor" if optimizer == "Adafactor" else "constant")
    flat = built.optimizer.layout
    flat.compiled_writes = True      # as compile.step_graphs sets it
    step = ApplyStep(flat.zeros(f"{tag}.grad"), built.optimizer, max_grad_norm=1.0,
                     loss_scaler=DynamicLossScaler() if fp16 else None)
    return step, Tensor(np.ones(2, np.float32)), Tensor(1.0, ms.float32)


@pytest.mark.parametrize("optimizer, fp16", [("AdamW", False), ("AdamW", True), ("Adafactor", False),
                                             ("Prodigy", False)])
def test_apply_graph_does_not_grow_with_the_lora_tensor_count(optimizer, fp16):
    small = graph_op_counts(*apply_step(50, optimizer, fp16, f"small{optimizer}{fp16}"))
    large = graph_op_counts(*apply_step(400, optimizer, fp16, f"large{optimizer}{fp16}"))
    assert small["InplaceCopy"] >= 50 and sum(small.values()) > 100     # a real graph's counts
    grown = {op: large[op] - small[op] for op in set(small) | set(large) if large[op] != small[op]}
    assert grown == {op: n * 350 for op, n in PER_TENSOR.items()}
