"""fp16 loss scaling in the real ApplyStep, compiled with ms.jit as the trainer runs it: an
overflowing step is skipped (weights, optimizer state unchanged, scale halved, counted, logged,
the LR schedule held back), and the steps around it update exactly as unscaled training would."""

import json

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, ops

from library.training.compile import StepGraph
from library.training.grad_ops import DynamicLossScaler
from library.training.logs import RunLog
from library.training.loss_scale_policy import LossScaleWatch
from library.training.optimizer_cells import AdamW, ParamGroup
from library.training.step import ApplyStep

SHAPES = [(3, 4), (5,)]


def make_apply(prefix, scaler):
    weights = [Parameter(Tensor(np.random.default_rng(i).standard_normal(s).astype(np.float32)),
                         name=f"{prefix}.w{i}") for i, s in enumerate(SHAPES)]
    optimizer = AdamW([ParamGroup(weights, 1e-2, "all")])
    buffers = optimizer.layout.zeros(f"{prefix}.g")     # one flat buffer: one group
    return ApplyStep(buffers, optimizer, max_grad_norm=1.0, loss_scaler=scaler), weights, buffers


def fill(buffer, values):
    # in place: a compiled graph keeps reading the memory it was compiled with, which set_data
    # would replace after the first run
    ops.assign(buffer, Tensor(values))


def snapshot(cell):
    return {name: p.asnumpy().copy() for name, p in cell.parameters_dict().items()}


def test_overflow_step_is_skipped_and_the_others_match_unscaled_training(tmp_path):
    scaler = DynamicLossScaler(init_scale=2.0 ** 10, growth_interval=1000)
    scaled, weights, buffers = make_apply("scaled", scaler)
    plain, ref_weights, ref_buffers = make_apply("plain", None)
    assert {"loss_scale.scale", "loss_scale.good_steps", "loss_scale.skipped_steps"} <= set(
        scaled.parameters_dict())         # saved with the apply step's state
    assert plain.loss_scaler is None and not any(
        n.startswith("loss_scale") for n in plain.parameters_dict())
    run_scaled, run_plain = StepGraph(scaled), StepGraph(plain)
    log = RunLog(str(tmp_path / "log.jsonl"))
    watch = LossScaleWatch(scaler, log)
    lrs, accumulation = Tensor(np.array([1e-2], np.float32)), Tensor(2.0, ms.float32)
    rng = np.random.default_rng(5)
    positions, scales = [], []
    for step, overflow in enumerate([False, True, False, False]):
        grads = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
        scale = float(scaler.scale.asnumpy())
        # what the grad step leaves after 2 accumulated micro-steps: the sum of scaled grads
        flat = np.concatenate([2 * scale * g.ravel() for g in grads])
        if overflow:
            flat[np.prod(SHAPES[0]) + 1] = np.inf      # in the second tensor
        fill(buffers[0], flat)
        before = snapshot(scaled)
        positions.append(watch.schedule_step(step))
        norm = float(run_scaled(lrs, accumulation).asnumpy())
        scalars = watch.after_apply(step + 1, 1)
        scales.append(scalars["loss_scale"])
        after = snapshot(scaled)
        assert all(not b.asnumpy().any() for b in buffers)     # zeroed either way
        if overflow:
            assert not np.isfinite(norm)
            for name in before:
                if not name.startswith(("loss_scale", "scaled.g")):   # weights, optimizer state
                    np.testing.assert_array_equal(after[name], before[name], err_msg=name)
            continue
        fill(ref_buffers[0], np.concatenate([2 * g.ravel() for g in grads]))
        ref_norm = float(run_plain(lrs, accumulation).asnumpy())
        np.testing.assert_allclose(norm, ref_norm, rtol=1e-6)
        for w, r in zip(weights, ref_weights):
            np.testing.assert_allclose(w.asnumpy(), r.asnumpy(), rtol=1e-6, atol=1e-7)
    assert scales == [1024.0, 512.0, 512.0, 512.0]
    assert positions == [0, 1, 1, 2]          # the schedule does not advance on the skip
    assert int(scaled.optimizer.step_count.asnumpy()) == 3
    assert int(scaler.skipped_steps.asnumpy()) == watch.skipped() == 1
    log.close()
    events = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [(e["event"], e["step"], e["loss_scale"]) for e in events] == [("skipped_step", 2, 512.0)]
