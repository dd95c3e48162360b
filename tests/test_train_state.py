"""State folders (library/training/state.py) and kohya's output names (filenames.py): round trip,
what a kill during a save leaves behind, and the checks a resume makes. The end-to-end resume of
a killed CLI run is in test_train_cli.py."""

import json
import os
from types import SimpleNamespace

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn, Parameter, ParameterTuple, Tensor

from library.errors import UserError
from library.safetensors_io import SafetensorsFile
from library.training import filenames as names
from library.training import state as S
from library.training.flat import FlatLayout
from library.training.optimizer_cells import ParamGroup


class FakeOptimizer(nn.Cell):
    """An optimizer's Parameters: the trainable ones in its flat layout, a flat moment per
    segment and the step counter."""

    def __init__(self, trainable, moment_value=0.0, with_extra=False, groups=1):
        super().__init__(auto_prefix=False)
        per_group = -(-len(trainable) // groups)
        self.layout = FlatLayout([ParamGroup(trainable[i:i + per_group], 1.0, f"g{i}")
                                  for i in range(0, len(trainable), per_group)])
        self.moments = ParameterTuple(
            Parameter(Tensor(np.full(s.size, moment_value, np.float32)), name=f"exp_avg.{s.name}")
            for s in self.layout.segments)
        self.step_count = Parameter(Tensor(7, ms.int32), name="optimizer.step")
        self.scratch = Parameter(Tensor(np.ones(3, np.float32)), name="adamw_staging.group0")
        self.scratch_names = {self.scratch.name}      # working memory, not saved
        if with_extra:
            self.extra = Parameter(Tensor(1.0, ms.float32), name="prodigy.d")


class FakeApplyStep(nn.Cell):
    """The Parameters an ApplyStep holds: the trainable ones (through its optimizer), the
    optimizer's state, and the gradient buffers (not saved)."""

    def __init__(self, trainable, moment_value=0.0, with_extra=False, groups=1):
        super().__init__(auto_prefix=False)
        self.optimizer = FakeOptimizer(trainable, moment_value, with_extra, groups)
        self.grad_buffers = ParameterTuple(
            Parameter(Tensor(np.ones(s.size, np.float32)), name=f"grad_buffer.{s.name}")
            for s in self.optimizer.layout.segments)


def network(seed, shapes=((4, 3), (3, 4))):
    rng = np.random.default_rng(seed)
    return [Parameter(Tensor(rng.standard_normal(s).astype(np.float32)), name=f"lora.{i}.weight")
            for i, s in enumerate(shapes)]


PROGRESS = {"current_epoch": 2, "current_step": 15, "seed": 3, "max_train_steps": 40,
            "data_position": {"seed": 3, "epoch": 2, "batch": 5}, "loss_sum": 0.1 + 0.2,
            "loss_count": 15}


def test_round_trip_restores_every_parameter_and_the_progress(tmp_path):
    saved_net = network(0)
    saved = FakeApplyStep(saved_net, moment_value=0.5)
    folder = S.save_state(tmp_path / "mem-step00000015-state", saved_net, saved, PROGRESS)
    assert sorted(os.listdir(folder)) == ["network.safetensors", "optimizer.safetensors",
                                          "train_state.json"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]

    fresh_net = network(1)
    fresh = FakeApplyStep(fresh_net)
    record = S.load_state(folder, fresh_net, fresh)
    for a, b in zip(saved_net, fresh_net):
        np.testing.assert_array_equal(a.asnumpy(), b.asnumpy())
    for a, b in zip(saved.optimizer.moments, fresh.optimizer.moments):
        np.testing.assert_array_equal(a.asnumpy(), b.asnumpy())
    assert int(fresh.optimizer.step_count.asnumpy()) == 7
    np.testing.assert_array_equal(fresh.grad_buffers[0].asnumpy(), 1.0)   # buffers are not state
    assert "adamw_staging.group0" not in SafetensorsFile(folder / "optimizer.safetensors").keys()
    assert record["loss_sum"] == 0.1 + 0.2 and record["data_position"]["batch"] == 5
    assert record["current_step"] == 15 and record["current_epoch"] == 2


def test_a_kill_during_a_save_leaves_the_old_state_or_none(tmp_path, monkeypatch):
    net = network(0)
    folder = tmp_path / "mem-state"
    S.save_state(folder, net, FakeApplyStep(net, 0.5), PROGRESS)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(S, "write_atomically", killed)     # dies before train_state.json
    newer = network(2)
    with pytest.raises(KeyboardInterrupt):
        S.save_state(folder, newer, FakeApplyStep(newer, 9.0), {**PROGRESS, "current_step": 20})
    with pytest.raises(KeyboardInterrupt):
        S.save_state(tmp_path / "other-state", newer, FakeApplyStep(newer), PROGRESS)
    assert sorted(os.listdir(tmp_path)) == ["mem-state"]
    assert S.read_progress(folder)["current_step"] == 15     # the old state is intact

    # what SIGKILL leaves (no cleanup runs): a temp folder without a progress file
    leftover = tmp_path / ".tmp-mem-state-123"
    leftover.mkdir()
    (leftover / "network.safetensors").write_bytes(b"partial")
    with pytest.raises(UserError, match="train_state.json"):
        S.read_progress(leftover)


@pytest.mark.parametrize("change, message", [
    (dict(shapes=((4, 2), (2, 4))), "shape"),
    (dict(shapes=((4, 3),)), "does not match"),
    (dict(with_extra=True), "optimizer state does not match"),
    (dict(groups=2), "laid out for other parameter groups"),
    (dict(order=True), "same counts in another order"),
])
def test_resume_refuses_a_state_of_another_network_or_optimizer(tmp_path, change, message):
    net = network(0)
    folder = S.save_state(tmp_path / "s", net, FakeApplyStep(net), PROGRESS)
    other = network(1, change.get("shapes", ((4, 3), (3, 4))))
    if change.get("order"):     # same shapes and names, another place in the flat vector
        other = other[::-1]
    with pytest.raises(UserError, match=message):
        S.load_state(folder, other, FakeApplyStep(other, with_extra=change.get("with_extra", False),
                                                   groups=change.get("groups", 1)))


def test_a_state_with_per_tensor_optimizer_state_is_refused(tmp_path):
    """A state folder of the earlier layout (format /1: a moment per LoRA tensor) is refused
    by name, with the way forward, before any tensor is read."""
    net = network(0)
    folder = S.save_state(tmp_path / "old-step00000015-state", net, FakeApplyStep(net), PROGRESS)
    record = json.loads((folder / "train_state.json").read_text())
    (folder / "train_state.json").write_text(json.dumps({**record, "format": S.PER_TENSOR_FORMAT}))
    with pytest.raises(UserError, match=r"per LoRA tensor.*--network_weights "
                                        r"<output_dir>/<name>-step00000015\.safetensors"):
        S.load_state(folder, net, FakeApplyStep(net))


def test_resume_checks_the_folder_and_the_options(tmp_path):
    with pytest.raises(UserError, match="not a folder"):
        S.read_progress(tmp_path / "missing")
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "train_state.json").write_text(
        json.dumps({"current_epoch": 1, "current_step": 3}))     # a kohya (accelerate) state
    with pytest.raises(UserError, match="kohya's PyTorch"):
        S.read_progress(tmp_path / "torch")
    args = SimpleNamespace(seed=4, max_train_steps=40)
    with pytest.raises(UserError, match="--seed 3"):
        S.check_compatible(PROGRESS, "f", args, 1)
    with pytest.raises(UserError, match="past --max_train_steps 10"):
        S.check_compatible(PROGRESS, "f", SimpleNamespace(seed=3, max_train_steps=10), 1)
    with pytest.raises(UserError, match="2 process"):
        S.check_compatible({**PROGRESS, "world_size": 2}, "f", args, 1)
    S.check_compatible(PROGRESS, "f", SimpleNamespace(seed=3, max_train_steps=40), 1)


def test_kohya_names_and_what_keeping_the_last_n_removes():
    args = SimpleNamespace(output_name=None, save_every_n_steps=5, save_every_n_epochs=2)
    assert names.last_name(args) == "last.safetensors"
    assert names.epoch_state_name(args, 3) == "epoch-000003-state"
    assert names.step_state_name(args, 100) == "at-step00000100-state"
    assert names.last_state_name(args) == "last-state"
    args.output_name = "mem"
    assert names.step_name(args, 100) == "mem-step00000100.safetensors"
    assert names.epoch_name(args, 3) == "mem-000003.safetensors"
    # kohya's get_remove_step_no: keep 10 steps, saving every 5 -> at 20 remove 5
    assert [names.step_to_remove(args, s, 10) for s in (5, 10, 15, 20, 25)] == \
        [None, None, None, 5, 10]
    assert names.step_to_remove(args, 20, None) is None
    assert [names.epoch_to_remove(args, e, 2) for e in (2, 4, 6)] == [None, None, 2]
