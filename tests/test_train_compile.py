"""Step-graph compile management: compiling ahead without running, the batch shapes a run
compiles for, --max_bucket_count, and (under `full`) a CLI run that compiles exactly one graph
per bucket."""

import json
import random

import numpy as np
import pytest
from mindspore import nn, ops, Parameter, Tensor

from library.data.bucket_cap import batch_shape_count, cap_buckets
from library.data.dataset import build_dataset_groups
from library.data.examples import load_sample
from library.errors import UserError
from library.training.compile import StepGraph, batch_shapes, jit_api, uses_dynamic_shapes
from test_data_dataset import dataset_config, make_images, subset

ms_api = jit_api()    # ms_compile_cache: every graph ms.jit has compiled in this process


class Accumulate(nn.Cell):
    """A side effect like the apply step's: running it changes a Parameter."""

    def __init__(self):
        super().__init__()
        self.total = Parameter(Tensor(np.zeros(3, np.float32)), name="compile_test.total")

    def construct(self, x):
        ops.assign(self.total, self.total + x * 2)
        return self.total.sum()


def test_compile_builds_the_graph_without_running_it_and_the_call_reuses_it():
    cell = Accumulate()
    graph = StepGraph(cell)
    x = Tensor(np.ones(3, np.float32))
    seconds = graph.compile(x)
    assert seconds > 0
    assert not cell.total.asnumpy().any()            # compiling ran nothing
    graphs = len(ms_api.ms_compile_cache)
    assert float(graph(x).asnumpy()) == 6.0
    assert len(ms_api.ms_compile_cache) == graphs    # the call found the compiled graph
    graph.compile(Tensor(np.ones(1, np.float32)))    # a new shape is a new graph
    assert len(ms_api.ms_compile_cache) == graphs + 1
    np.testing.assert_array_equal(cell.total.asnumpy(), [2, 2, 2])


SIZES = [(64, 64)] * 3 + [(96, 32)] * 2 + [(32, 96)] + [(128, 32)]   # four buckets


def group_of(tmp_path, batch_size=2, validation_split=0.0):
    folder = make_images(tmp_path / "img", SIZES)
    return build_dataset_groups([dataset_config([subset(folder)], batch_size=batch_size,
                                                validation_split=validation_split)], seed=1)


def test_batch_shapes_holds_one_batch_per_bucket_and_length(tmp_path):
    train, _ = group_of(tmp_path, batch_size=2)
    shapes = [(train.datasets[di].records[idx[0]].bucket.bucket_wh, len(idx))
              for di, idx in batch_shapes(train, seed=3)]
    # 3 images of 64x64 in batches of 2: a full batch and a short one
    assert shapes == [((32, 96), 1), ((64, 64), 1), ((64, 64), 2), ((96, 32), 2), ((128, 32), 1)]
    assert batch_shape_count(train) == len(shapes)


def test_dynamic_shapes_when_the_run_has_more_than_one_batch_shape(tmp_path):
    from library.training.args import parse_args
    _, args = parse_args(["--network_module", "networks.lora", "--seed", "3"])
    train, _ = group_of(tmp_path / "four", batch_size=2)
    assert uses_dynamic_shapes(args, train)
    one = build_dataset_groups([dataset_config([subset(make_images(tmp_path / "one", [(64, 64)] * 4))],
                                              batch_size=2)], seed=1)[0]
    assert len(batch_shapes(one, 3)) == 1 and not uses_dynamic_shapes(args, one)
    args.static_shapes = True
    assert not uses_dynamic_shapes(args, train)


def test_max_bucket_count_moves_images_to_the_nearest_kept_bucket(tmp_path):
    train, _ = group_of(tmp_path)
    assert train.bucket_shapes() == [(32, 96), (64, 64), (96, 32), (128, 32)]
    assert cap_buckets(train, 4) is None                 # already within the cap
    cap = cap_buckets(train, 3)
    # kept: the most samples (64x64: 3, 96x32: 2), then the tie 32x96 / 128x32 by shape order
    assert train.bucket_shapes() == [(32, 96), (64, 64), (96, 32)]
    assert (cap.buckets_before, cap.buckets_after) == ([(32, 96), (64, 64), (96, 32), (128, 32)],
                                                       [(32, 96), (64, 64), (96, 32)])
    # batches of 2: the moved image makes 96x32 three samples, a full batch and a short one, so
    # the short 128x32 batch's graph is traded for a short 96x32 one and nothing is saved
    assert (cap.images_moved, cap.samples_moved, cap.graphs_before, cap.graphs_after) == (1, 1, 5, 5)
    assert cap.estimated_seconds_saved([40.0, 60.0]) == 0.0
    assert cap.mean_ar_error_after > cap.mean_ar_error_before == 0.0
    ds = train.datasets[0]
    moved = [r for r in ds.records if r.original_wh == (128, 32)][0]
    # aspect 4 goes to 96x32 (aspect 3): resized to cover it (height 32), then cropped
    assert (moved.bucket.bucket_wh, moved.bucket.resized_wh, moved.bucket.ar_error) == (
        (96, 32), (128, 32), -1.0)
    sample = load_sample(moved, ds.config, random.Random(0))
    assert sample["image"].shape == (32, 96, 3)
    assert sample["target_size_hw"] == (32, 96)
    assert sum(len(v) for v in ds.buckets.values()) == len(SIZES) == train.num_samples()
    json.dumps(cap.as_dict())                            # goes to the JSON-lines log


def test_max_bucket_count_moves_validation_images_too_and_must_be_positive(tmp_path):
    train, val = group_of(tmp_path, validation_split=0.5)
    cap = cap_buckets(train, 1, val)
    assert len(train.bucket_shapes()) == 1 and cap.images_moved > 0
    assert set(val.bucket_shapes()) <= set(train.bucket_shapes())
    with pytest.raises(UserError, match="--max_bucket_count 0"):
        cap_buckets(train, 0)


@pytest.mark.full
def test_cli_compiles_one_graph_per_bucket_ahead_with_fp16_scaling(tiny_ckpt, tmp_path):
    """(full: one CLI run, four compiles, several minutes on 2 cores.) Four buckets capped to
    three by --max_bucket_count; --compile_all_buckets_first compiles the three grad graphs and
    the apply graph before step 1 and training compiles nothing more; --mixed_precision fp16
    logs the loss scale."""
    from conftest import run_tool
    folder = make_images(tmp_path / "img" / "1_sks", SIZES)
    for path in folder.glob("*.png"):
        path.with_suffix(".txt").write_text("a noise picture")
    out = tmp_path / "out"
    run_tool("sdxl_train_network.py", "--pretrained_model_name_or_path", tiny_ckpt,
             "--network_module", "networks.lora", "--output_dir", out, "--output_name", "cap",
             "--train_data_dir", tmp_path / "img", "--caption_extension", ".txt",
             "--resolution", "64", "--enable_bucket", "--min_bucket_reso", "32",
             "--max_bucket_reso", "128", "--bucket_reso_steps", "32",
             "--network_train_unet_only", "--cache_latents", "--cache_text_encoder_outputs",
             "--mixed_precision", "fp16", "--max_bucket_count", "3", "--static_shapes",
             "--compile_all_buckets_first", "--max_train_epochs", "1",
             "--max_data_loader_n_workers", "0", "--seed", "3")
    lines = [json.loads(x) for x in open(out / "cap_log.jsonl")]
    events = [x for x in lines if "event" in x]
    cap = [e for e in events if e["event"] == "bucket_cap"][0]
    assert (len(cap["buckets_before"]), len(cap["buckets_after"]), cap["images_moved"]) == (4, 3, 1)
    compiles = [e for e in events if e["event"] == "compile"]
    grad = [e for e in compiles if e["graph"] == "grad_step"]
    assert len(grad) == 3 and all(e["ahead"] for e in compiles)
    assert sorted(tuple(e["shape"][2:]) for e in grad) == [(4, 12), (8, 8), (12, 4)]
    assert [e["graph"] for e in compiles].count("apply_step") == 1
    steps = [x for x in lines if "step" in x and "event" not in x]
    # one epoch of 7 batches; a step that overflowed halved the scale (none is expected here)
    assert len(steps) == 7
    assert all(x["loss_scale"] == 2.0 ** 16 * 0.5 ** x["skipped_steps"] for x in steps)
    end = events[-1]
    assert end["event"] == "end" and end["compiled_graphs"] == 4    # and one apply graph
    saved = [e for e in events if e["event"] == "bucket_cap_savings"][0]
    assert saved["estimated_compile_seconds_saved"] > 0


def test_compile_all_buckets_first_with_pynative_is_a_parse_time_error():
    from library.training.args import parse_args
    from library.training.plan import check_contradictions
    _, args = parse_args(["--compile_all_buckets_first", "--pynative", "--network_module",
                          "networks.lora"])
    with pytest.raises(UserError, match="--compile_all_buckets_first"):
        check_contradictions(args)
    # the default step is compiled before step 1 anyway: the option would do nothing
    _, args = parse_args(["--compile_all_buckets_first", "--network_module", "networks.lora"])
    with pytest.raises(UserError, match="--static_shapes only"):
        check_contradictions(args)


def test_a_step_graph_with_open_axes_runs_every_shape_from_one_compile():
    """StepGraph with a signature (None = open axis): compiled ahead from the signature alone,
    then run at three shapes with no new graph."""
    import mindspore as ms
    cell = Accumulate()
    graph = StepGraph(cell, [Tensor(shape=[None], dtype=ms.float32)])
    graph.compile(*cell.get_inputs())
    graphs = len(ms_api.ms_compile_cache)
    for n in (3, 1, 3):
        graph(Tensor(np.ones(n, np.float32)))
    assert len(ms_api.ms_compile_cache) == graphs
    # total += 2 * x, three times (the length-1 x broadcasts over the length-3 total)
    np.testing.assert_array_equal(cell.total.asnumpy(), [6, 6, 6])


# --- the command line: one graph for every bucket, and the compile cache ---------------------

def train_on_buckets(tiny_ckpt, tmp_path, name, *extra, images=None):
    """A CLI run on four bucket shapes in batches of 2 (two short last batches): 5 steps."""
    from conftest import run_tool
    images = images or tmp_path / "img"
    if not images.exists():
        folder = make_images(images / "1_sks", SIZES)
        for path in folder.glob("*.png"):
            path.with_suffix(".txt").write_text("a noise picture")
    out = tmp_path / name
    run_tool("sdxl_train_network.py", "--pretrained_model_name_or_path", tiny_ckpt,
             "--network_module", "networks.lora", "--output_dir", out, "--output_name", "b",
             "--train_data_dir", images, "--caption_extension", ".txt", "--resolution", "64",
             "--enable_bucket", "--min_bucket_reso", "32", "--max_bucket_reso", "128",
             "--bucket_reso_steps", "32", "--train_batch_size", "2", "--network_dim", "4",
             "--network_train_unet_only", "--cache_latents", "--cache_text_encoder_outputs",
             "--max_train_epochs", "1", "--max_data_loader_n_workers", "0", "--seed", "3",
             "--learning_rate", "1e-3", *extra)
    from test_train_cli import _lora_tensors, read_log
    steps, events = read_log(out / "b_log.jsonl")
    return _lora_tensors(out / "b.safetensors"), steps, events


@pytest.fixture(scope="module")
def dynamic_run(tiny_ckpt, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dynamic")
    return tmp, train_on_buckets(tiny_ckpt, tmp, "dyn", "--compile_cache_dir", tmp / "cache")


def assert_lora_close(a, b, rtol):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=rtol * np.abs(b[k]).max(),
                                   err_msg=k)


def test_cli_compiles_one_grad_and_one_apply_graph_for_four_buckets(dynamic_run):
    _, (lora, steps, events) = dynamic_run
    start = next(e for e in events if e["event"] == "start")
    assert len(start["buckets"]) == 4 and len(steps) == 5
    compiles = [e for e in events if e["event"] == "compile"]
    assert [(e["graph"], e.get("shape"), e["ahead"], e["cache"]) for e in compiles] == [
        ("grad_step", [-1, 4, -1, -1], True, "miss"), ("apply_step", None, True, "miss")]
    end = events[-1]
    assert (end["event"], end["compiled_graphs"], end["cache_hits"]) == ("end", 2, 0)
    assert end["compile_seconds"] == pytest.approx(sum(e["seconds"] for e in compiles), abs=0.01)


def test_cli_a_repeated_run_loads_both_graphs_from_the_cache_and_trains_the_same(
        dynamic_run, tiny_ckpt):
    tmp, (lora, steps, _) = dynamic_run
    again, again_steps, events = train_on_buckets(tiny_ckpt, tmp, "again", "--compile_cache_dir",
                                                  tmp / "cache")
    compiles = [e for e in events if e["event"] == "compile"]
    assert [(e["graph"], e["cache"]) for e in compiles] == [("grad_step", "hit"),
                                                            ("apply_step", "hit")]
    assert events[-1]["cache_hits"] == 2
    assert [s["loss/current"] for s in again_steps] == [s["loss/current"] for s in steps]
    for k in lora:
        np.testing.assert_array_equal(again[k], lora[k], err_msg=k)     # bit for bit


@pytest.mark.full
def test_cli_dynamic_graph_trains_the_same_lora_as_static_graphs(dynamic_run, tiny_ckpt):
    """(full: five grad graphs.) --static_shapes compiles one graph per batch shape."""
    tmp, (lora, steps, _) = dynamic_run
    static, static_steps, events = train_on_buckets(tiny_ckpt, tmp, "static", "--static_shapes",
                                                    "--no_compile_cache")
    grad = [e for e in events if e["event"] == "compile" and e["graph"] == "grad_step"]
    assert len(grad) == 5
    np.testing.assert_allclose([s["loss/current"] for s in static_steps],
                               [s["loss/current"] for s in steps], rtol=1e-5)
    assert_lora_close(lora, static, rtol=1e-5)


CACHE_CHANGES = [("--loss_type", "l1"), ("--noise_offset", "0.1"), ("--min_snr_gamma", "5"),
                 ("--network_dim", "8"), ("--network_args", "conv_dim=4"),
                 ("--optimizer_type", "Lion"), ("--max_grad_norm", "0.01"),
                 ("--mixed_precision", "fp16")]


@pytest.mark.full
@pytest.mark.parametrize("change", CACHE_CHANGES + ["bucket order"], ids=str)
def test_cli_a_changed_option_never_runs_a_cached_graph_of_another(change, dynamic_run,
                                                                    tiny_ckpt, tmp_path):
    """(full: two runs per case.) A run sharing the cache folder with the first but changing
    one graph-shaping option trains as an uncached run with that option does. With only the
    buckets in another order (other images, the same one graph) it loads the cache."""
    tmp, _ = dynamic_run
    if change == "bucket order":
        images = tmp_path / "img"
        folder = make_images(images / "1_sks", SIZES[::-1])
        for path in folder.glob("*.png"):
            path.with_suffix(".txt").write_text("a noise picture")
        extra, kwargs = (), dict(images=images)
    else:
        extra, kwargs = change, {}
    cached, cached_steps, events = train_on_buckets(
        tiny_ckpt, tmp_path, "cached", *extra, "--compile_cache_dir", tmp / "cache", **kwargs)
    hits = [e["cache"] for e in events if e["event"] == "compile"]
    assert hits == (["hit", "hit"] if change == "bucket order" else ["miss", "miss"])
    fresh, fresh_steps, _ = train_on_buckets(tiny_ckpt, tmp_path, "fresh", *extra,
                                             "--no_compile_cache", **kwargs)
    assert cached_steps[0]["loss/current"] == fresh_steps[0]["loss/current"]
    for k in fresh:
        np.testing.assert_array_equal(cached[k], fresh[k], err_msg=k)
