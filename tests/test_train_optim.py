"""Optimizers against golden trajectories of the PyTorch implementations kohya uses
(tests/fixtures/train_golden/optimizers.json), the option parsing, clipping and loss scaling."""

import json
from pathlib import Path

import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, Parameter, Tensor

from library.errors import UserError
from library.training.optimizer_options import build_optimizer, parse_optimizer_args
from library.training.optimizer_cells import ParamGroup

GOLDEN = json.loads((Path(__file__).parent / "fixtures/train_golden/optimizers.json").read_text())


def make_groups(group_lrs, tag):
    params = {k: Parameter(Tensor(np.asarray(v, np.float32)), name=f"{tag}.{k}")
              for k, v in GOLDEN["init"].items()}
    groups = [ParamGroup([params[k] for k in names], lr, f"group{i}")
              for i, (names, lr) in enumerate(zip(GOLDEN["groups"], group_lrs))]
    return params, groups


def grads_for(optimizer, names, step):
    """grad = A·(p - T) + noise[step], from the current parameter values (as the golden run)."""
    out = []
    for p, name in zip(optimizer.params, names):
        key = name.split(".")[-1]
        value = p.asnumpy().astype(np.float64)
        g = np.asarray(GOLDEN["A"][key]) * (value - np.asarray(GOLDEN["T"][key]))
        out.append(Tensor((g + np.asarray(GOLDEN["noise"][step][key])).astype(np.float32)))
    return tuple(out)


def build(case, tag):
    kwargs = case["kwargs"]
    args = [f"{k}={tuple(v) if isinstance(v, list) else v}" for k, v in kwargs.items()]
    lr = max(case["group_lrs"])
    params, groups = make_groups(case["group_lrs"], tag)
    scheduler = "adafactor" if case["optimizer"] == "Adafactor" else "constant"
    return params, build_optimizer(groups, lr, case["optimizer"], args, lr_scheduler=scheduler).optimizer


class Update(nn.Cell):
    """The optimizer on the flat gradient vectors of its layout, as the apply step runs it."""

    def __init__(self, optimizer):
        super().__init__(auto_prefix=False)
        self.optimizer = optimizer

    def construct(self, grads, lrs):
        return self.optimizer(self.optimizer.layout.flatten(grads), lrs)


def case_id(case):
    return case["optimizer"] + "(" + ",".join(f"{k}={v}" for k, v in case["kwargs"].items()) + ")"


def rtol_for(case):
    # prodigyopt's own float32 and float64 runs of this case differ by 1e-5 relative: with
    # beta1=0 the update is proportional to d², and d is a ratio of long float sums
    if case["optimizer"] == "Prodigy" and case["kwargs"].get("betas", [1])[0] == 0:
        return 5e-5
    # AdamW's fused kernel (rescaled lr/eps/decay) changes only the rounding: within 1e-6
    return 1e-6 if case["optimizer"] == "AdamW" else 1e-5


def run_case(case, tag, compiled=True, steps=None, elementwise=False):
    params, optimizer = build(case, tag)
    if elementwise:      # AdamW without its fused kernel, as arguments the kernel refuses get it
        optimizer.fused = False
    names = [p.name for p in optimizer.params]
    update = Update(optimizer)
    if compiled:
        optimizer.layout.compiled_writes = True     # as compile.step_graphs sets it
        update = ms.jit(update.construct)
    for step, expected in enumerate(case["trajectory"][:steps]):
        lrs = Tensor((np.asarray(case["group_lrs"]) * GOLDEN["mult"][step]).astype(np.float32))
        # grads made outside the graph must be mutable, or each new value recompiles
        update(ms.mutable(grads_for(optimizer, names, step)), lrs)
        for key, value in expected.items():
            np.testing.assert_allclose(params[key].asnumpy(), np.asarray(value, np.float32),
                                       rtol=rtol_for(case), atol=1e-6, err_msg=f"step {step} {key}")
    return params


@pytest.mark.parametrize("index", range(len(GOLDEN["cases"])), ids=[case_id(c) for c in GOLDEN["cases"]])
def test_compiled_optimizer_follows_reference_trajectory(index):
    run_case(GOLDEN["cases"][index], f"jit{index}")


ADAMW_CASES = [i for i, c in enumerate(GOLDEN["cases"]) if c["optimizer"] == "AdamW"]


@pytest.mark.parametrize("index", ADAMW_CASES)
def test_adamw_elementwise_formula_follows_reference_trajectory(index):
    """The golden AdamW cases run on ops.AdamWeightDecay (fused, with rescaled lr/eps/decay);
    the elementwise formula, for betas, eps or decay outside what the kernel accepts (e.g.
    beta1 = 0), must follow the same trajectories."""
    run_case(GOLDEN["cases"][index], f"elementwise{index}", elementwise=True)


FIRST_CASE_OF_EACH = {c["optimizer"]: i for i, c in reversed(list(enumerate(GOLDEN["cases"])))}


@pytest.mark.parametrize("name", sorted(FIRST_CASE_OF_EACH))
def test_pynative_update_equals_compiled(name):
    """Same optimizer, three steps eagerly and three compiled: the same parameters."""
    case = GOLDEN["cases"][FIRST_CASE_OF_EACH[name]]
    eager = run_case(case, f"eager{name}", compiled=False, steps=3)
    compiled = run_case(case, f"graph{name}", compiled=True, steps=3)
    for key in eager:
        np.testing.assert_allclose(eager[key].asnumpy(), compiled[key].asnumpy(), rtol=1e-6, atol=1e-7)


def test_parse_optimizer_args_types():
    assert parse_optimizer_args(["weight_decay=0.1", "betas=(0.9,0.99)", "relative_step=False",
                                 "beta1=None"]) == {"weight_decay": 0.1, "betas": (0.9, 0.99),
                                                    "relative_step": False, "beta1": None}
    for bad in ("weight_decay", "=3", "betas=(0.9,", "eps=1e-8x"):
        with pytest.raises(UserError, match="--optimizer_args"):
            parse_optimizer_args([bad])


@pytest.mark.parametrize("optimizer_type, args, message", [
    ("DAdaptation", [], "DAdaptation is not supported; supported optimizers: AdamW, Lion"),
    ("AdEMAMix8bit", [], "AdEMAMix8bit is not supported"),
    ("torch.optim.RAdam", [], "not supported"),
    ("AdamW", ["amsgrad=True", "foo=1"], "amsgrad, foo: not accepted by AdamW"),
    ("Prodigy", ["slice_p=11"], "slice_p"),
    ("AdamW", ["betas=0.9"], "a pair of numbers"),
    ("Lion", ["decoupled_weight_decay=1"], "True or False"),
    ("SGDNesterov", ["momentum=0"], "momentum"),
])
def test_unsupported_optimizers_and_args_are_user_errors(optimizer_type, args, message):
    _, groups = make_groups([1e-3, 1e-3], "err")
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        build_optimizer(groups, 1e-3, optimizer_type, args)


@pytest.mark.parametrize("optimizer_type, runs, kohya_name", [
    ("AdamW8bit", "AdamW", "torch.optim.adamw.AdamW"),
    ("PagedAdamW8bit", "AdamW", "torch.optim.adamw.AdamW"),
    ("PagedAdamW", "AdamW", "torch.optim.adamw.AdamW"),
    ("Lion8bit", "Lion", "lion_pytorch.lion_pytorch.Lion"),
    ("PagedLion8bit", "Lion", "lion_pytorch.lion_pytorch.Lion"),
    ("SGDNesterov8bit", "SGDNesterov", "torch.optim.sgd.SGD"),
])
def test_bitsandbytes_names_run_their_32_bit_optimizer(optimizer_type, runs, kohya_name, caplog):
    _, groups = make_groups([1e-3, 1e-3], f"bnb{optimizer_type}")
    built = build_optimizer(groups, 1e-3, optimizer_type, ["weight_decay=0.1"])
    assert type(built.optimizer).__name__ == runs
    assert built.ss_optimizer.startswith(f"{kohya_name}(weight_decay=0.1")
    assert built.ss_optimizer.endswith(f"for --optimizer_type {optimizer_type}: 32-bit state, "
                                       f"no bitsandbytes")
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith(f"--optimizer_type {optimizer_type}: running {runs} with the same "
                              f"update rule and 32-bit state")


def test_use_8bit_adam_is_adamw8bit():
    _, groups = make_groups([1e-3, 1e-3], "old8")
    built = build_optimizer(groups, 1e-3, use_8bit_adam=True)
    assert type(built.optimizer).__name__ == "AdamW" and "AdamW8bit" in built.ss_optimizer
    with pytest.raises(UserError, match="--use_8bit_adam cannot be combined"):
        build_optimizer(groups, 1e-3, "Lion", use_8bit_adam=True)


def test_prodigy_rejects_different_group_lrs():
    _, groups = make_groups([1.0, 0.5], "prod")
    with pytest.raises(UserError, match="group0=1.0, group1=0.5"):
        build_optimizer(groups, 1.0, "Prodigy")


def test_adafactor_relative_step_forces_its_schedule():
    _, groups = make_groups([1e-3, 1e-3], "ada")
    built = build_optimizer(groups, 1e-3, "Adafactor", [], lr_scheduler="constant")
    assert built.lr_scheduler == "adafactor" and built.kohya_args == "relative_step=True"
    assert built.kohya_name == "transformers.optimization.Adafactor"
    _, groups = make_groups([1e-3, 1e-3], "ada2")
    with pytest.raises(UserError, match="--lr_scheduler cosine has no effect"):
        build_optimizer(groups, 1e-3, "Adafactor", [], lr_scheduler="cosine")
    _, groups = make_groups([1e-3, 1e-3], "ada3")
    manual = build_optimizer(groups, 1e-3, "Adafactor", ["relative_step=False"], lr_scheduler="cosine")
    assert manual.lr_scheduler == "cosine"
    _, groups = make_groups([1e-3, 1e-3], "ada4")  # kohya turns relative_step on for warmup_init
    forced = build_optimizer(groups, 1e-3, "Adafactor", ["relative_step=False", "warmup_init=True"])
    assert forced.lr_scheduler == "adafactor" and forced.optimizer.relative_step


def test_default_is_adamw_with_torch_defaults_and_sgd_gets_kohyas_momentum():
    _, groups = make_groups([1e-3, 1e-3], "def")
    built = build_optimizer(groups, 1e-3)
    assert type(built.optimizer).__name__ == "AdamW" and built.kohya_name == "torch.optim.adamw.AdamW"
    assert float(built.optimizer.weight_decay.asnumpy()) == pytest.approx(0.01)
    _, groups = make_groups([1e-3, 1e-3], "sgd")
    assert build_optimizer(groups, 1e-3, "sgdnesterov").kohya_args == "momentum=0.9"
