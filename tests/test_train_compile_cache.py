"""The compile cache across runs: MindSpore's behaviour that makes it unsafe as shipped (pinned
on toy graphs, each in its own process: MindSpore fixes the cache folder per process), and the
key that makes it safe (every graph-shaping option changes the folder; host-only ones do not)."""

import json
import subprocess
import sys
import textwrap

import pytest

from library.training.args import parse_args
from library.training.compile_cache import graph_options, signature_of

TOY = textwrap.dedent('''
    import json, os, sys
    import numpy as np
    import mindspore as ms
    from mindspore import nn, ops, Parameter, Tensor
    folder, order, weight, constant = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])

    class Toy(nn.Cell):
        def __init__(self, k):
            super().__init__()
            self.k = k
            self.w = Parameter(Tensor(np.full(3, weight, np.float32)), name=f"w{k}")
            self.c = Tensor(np.full(3, constant, np.float32))    # a constant of the graph

        def construct(self, x):
            return ((self.w * x + self.c) * self.k).sum()

    ms.set_context(enable_compile_cache=True, compile_cache_path=folder)
    cells = {"a": Toy(2.0), "b": Toy(3.0)}
    x = Tensor(np.ones(3, np.float32))
    out = {k: float(ms.jit(cells[k].construct)(x).asnumpy()) for k in order}
    ms.set_context(enable_compile_cache=False)
    out["uncached"] = float(ms.jit(Toy(5.0).construct)(x).asnumpy())
    out["entries"] = sorted(os.listdir(os.path.join(folder, "rank_0", "graph_cache")))
    print(json.dumps(out))
''')


def run_toy(tmp_path, folder, order="ab", weight=1.0, constant=0.0):
    script = tmp_path / "toy.py"
    script.write_text(TOY)
    proc = subprocess.run([sys.executable, str(script), str(folder), order, str(weight),
                           str(constant)], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_mindspore_cache_entries_are_positional_and_bake_in_constants(tmp_path):
    """Why the cache needs our key: MindSpore's entries are the N-th cached compile of a
    process; a later process gets entry N whatever it compiles, with its constants."""
    folder = tmp_path / "cache"
    first = run_toy(tmp_path, folder)
    assert (first["a"], first["b"], first["uncached"]) == (6.0, 9.0, 15.0)
    # only the graphs compiled while the cache was on are entries
    assert first["entries"] == ["compile_cache_0.mindir", "compile_cache_1.mindir",
                                "compile_dependency.hash"]
    # Parameters are live: a new weight is used
    assert run_toy(tmp_path, folder, weight=2.0)["a"] == 12.0
    # a changed constant is not: the old graph runs (6.0, not 6.0 + 3 * 100 * 2)
    assert run_toy(tmp_path, folder, constant=100.0)["a"] == 6.0
    # another order gets the other graph's entry: b runs a's graph
    swapped = run_toy(tmp_path, folder, order="ba")
    assert swapped["b"] != 9.0


def args_with(*extra):
    _, args = parse_args(["--network_module", "networks.lora", "--output_dir", "out", *extra])
    return args


BASE = graph_options(args_with(), {})

GRAPH_SHAPING = [
    ("--loss_type", "l1"), ("--noise_offset", "0.05"), ("--min_snr_gamma", "5"),
    ("--network_dim", "8"), ("--optimizer_type", "Lion"), ("--max_grad_norm", "0.5"),
    ("--mixed_precision", "fp16"), ("--network_alpha", "2"), ("--huber_c", "0.2"),
    ("--multires_noise_iterations", "6"), ("--ip_noise_gamma", "0.1"),
    ("--v_parameterization",), ("--gradient_checkpointing",), ("--static_shapes",),
    ("--network_args", "conv_dim=4"), ("--optimizer_args", "weight_decay=0.1"),
    ("--debiased_estimation_loss",), ("--min_timestep", "100"),
]


@pytest.mark.parametrize("option", GRAPH_SHAPING, ids=lambda o: o[0])
def test_every_graph_shaping_option_changes_the_key(option):
    assert graph_options(args_with(*option), {}) != BASE


HOST_ONLY = [
    ("--output_name", "other"), ("--learning_rate", "1e-3"), ("--max_train_steps", "7"),
    ("--save_every_n_steps", "2"), ("--seed", "9"), ("--logging_dir", "logs"),
    ("--lr_scheduler", "cosine"), ("--compile_cache_dir", "elsewhere"),
]


@pytest.mark.parametrize("option", HOST_ONLY, ids=lambda o: o[0])
def test_options_that_never_reach_a_graph_keep_the_key(option):
    assert graph_options(args_with(*option), {}) == BASE


def test_the_seed_is_in_the_key_when_a_dropout_draws_in_the_graph():
    assert graph_options(args_with("--seed", "1", "--network_dropout", "0.1"), {}) != \
        graph_options(args_with("--seed", "2", "--network_dropout", "0.1"), {})
    assert graph_options(args_with("--seed", "1"), {"rank_dropout": "0.1"}) != \
        graph_options(args_with("--seed", "2"), {"rank_dropout": "0.1"})


def test_signatures_keep_open_axes_and_order():
    import mindspore as ms
    from mindspore import Tensor
    a = Tensor(shape=[None, 4, None, None], dtype=ms.float32)
    b = Tensor(shape=[2], dtype=ms.float32)
    assert signature_of([a, b]) == [[[-1, 4, -1, -1], "Float32"], [[2], "Float32"]]
    assert signature_of([b, a]) != signature_of([a, b])


WINDOW = textwrap.dedent('''
    import argparse, json, os, sys
    from library.training.compile_cache import CompileCache
    root = sys.argv[1]
    args = argparse.Namespace(no_compile_cache=False, compile_cache_dir=root)
    cache = CompileCache.open(args, {"graphs": "toy"})
    os.makedirs(cache.entries, exist_ok=True)
    stale = os.path.join(cache.entries, "compile_cache_0.mindir")
    open(stale, "w").write("half written by a killed run")
    with cache.window() as window:
        removed = not os.path.exists(stale)
        window.before_graph()
        window.after_graph()
    again = CompileCache.open(args, {"graphs": "toy"})     # a second run in the same process
    print(json.dumps(dict(removed=removed, finished=os.path.exists(cache.finished_marker),
                          hits=window.hits, count=window.count, again=again is None,
                          folders=os.listdir(root))))
''')


def test_entries_without_the_finished_marker_are_removed_and_a_process_opens_one_cache(tmp_path):
    from conftest import ROOT, _tool_env
    script = tmp_path / "window.py"
    script.write_text(WINDOW)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "root")], cwd=ROOT,
                          capture_output=True, text=True, env=_tool_env(None), check=True)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["removed"] and out["finished"] and out["count"] == 1 and out["hits"] == 0
    assert out["again"]                   # MindSpore fixes the folder per process: no second one
    assert len(out["folders"]) == 1       # one folder per key
