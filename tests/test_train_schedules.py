"""LR schedules against kohya's get_scheduler_fix (tests/fixtures/train_golden/lr_schedules.json)."""

import json
from pathlib import Path

import numpy as np
import pytest

from library.errors import UserError
from library.training.schedules import LRSchedule, LRScheduleOptions, int_or_float

GOLDEN = json.loads((Path(__file__).parent / "fixtures/train_golden/lr_schedules.json").read_text())


def case_id(case):
    return ",".join(f"{k}={v}" for k, v in case["args"].items()) + f",np={case['num_processes']}"


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=case_id)
def test_schedule_matches_kohya(case):
    args = dict(case["args"])
    for key in ("lr_warmup_steps", "lr_decay_steps"):
        if key in args:
            args[key] = int_or_float(str(args[key]))
    assert args.get("lr_warmup_steps", 0) == case["parsed_warmup"]
    schedule = LRSchedule(LRScheduleOptions(**args), GOLDEN["group_lrs"], GOLDEN["max_train_steps"],
                          GOLDEN["learning_rate"], num_processes=case["num_processes"])
    got = np.array([schedule.lrs(step) for step in range(len(case["lrs"]))])
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, np.array(case["lrs"]), rtol=1e-6, atol=1e-12)


def test_int_or_float_like_kohya():
    assert int_or_float("10") == 10 and isinstance(int_or_float("10"), int)
    assert int_or_float("0.1") == 0.1 and int_or_float("10%") == 0.1
    for bad in ("1.0", "abc", "x%"):
        with pytest.raises(UserError):
            int_or_float(bad)


@pytest.mark.parametrize("kwargs, message", [
    ({"lr_scheduler": "piecewise_constant"}, "not supported"),
    ({"lr_scheduler": "constant", "lr_warmup_steps": 10}, "constant_with_warmup"),
    ({"lr_scheduler": "adafactor", "lr_warmup_steps": 0.1}, "--lr_warmup_steps"),
    ({"lr_scheduler": "cosine_with_min_lr"}, "--lr_scheduler_min_lr_ratio"),
])
def test_bad_schedule_options_are_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        LRScheduleOptions(**kwargs)


def test_polynomial_needs_a_learning_rate_above_its_end():
    with pytest.raises(UserError, match="--learning_rate"):
        LRSchedule(LRScheduleOptions(lr_scheduler="polynomial"), [1e-8], 10, 1e-8)
