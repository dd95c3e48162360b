"""Benchmark: what compiling costs a run, static per-shape graphs against the one dynamic-shape
graph, and a repeated run with the compile cache, as a table.

    python bench/compile_step.py [--presets tiny,medium] [--buckets 1,3,6] [--steps 3]
                                 [--modes ab,cached]

Each case runs in its own process and builds the real run in-process from the trainer's own
arguments (`--network_dim 8 --network_train_unet_only --cache_latents
--cache_text_encoder_outputs`, AdamW, float32, batch 1) on a dataset with one image per bucket
shape, and makes its step graphs with the trainer's own `step_graphs`:
- `ab`: two runs side by side in one process (the same seed, so the same initial LoRA), one with
  `--static_shapes --compile_all_buckets_first` (a grad graph per bucket, then the apply graph),
  one with the default dynamic step (one grad graph, the apply graph), both `--no_compile_cache`;
  then their steps interleaved, shape by shape, so both see the same machine load (these cores
  are shared: only a ratio within one process means much);
- `cached`: the dynamic run twice with a fresh `--compile_cache_dir`; the first run fills the
  cache, the second loads its graphs from it.
"compile" is the seconds spent compiling the step graphs before step 1; "to first step" adds
building the compile inputs and the first step. s/step is, per bucket shape, the median of
--steps steps after that shape's first step (the tiny checkpoint; `medium` is
library.models.config.MEDIUM, SDXL's topology at a quarter of its width, random weights).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# (resolution, min, max, step) and the first six of kohya's buckets there, one image each
GEOMETRY = {
    "tiny": ((96, 32, 192, 32), [(96, 96), (64, 128), (128, 64), (32, 160), (160, 32), (32, 192)]),
    "medium": ((256, 128, 512, 64), [(256, 256), (192, 320), (320, 192), (128, 384), (384, 128),
                                     (128, 512)]),
}


def _dataset(folder, sizes):
    from PIL import Image, ImageDraw
    images = os.path.join(folder, "img", "1_bench")
    os.makedirs(images)
    for i, (w, h) in enumerate(sizes):
        img = Image.new("RGB", (w, h), "white")
        ImageDraw.Draw(img).ellipse([w * 0.2, h * 0.2, w * 0.8, h * 0.8], fill=(210, 40, 40))
        img.save(os.path.join(images, f"{i}.png"))
        with open(os.path.join(images, f"{i}.txt"), "w") as f:
            f.write("a red circle")
    return os.path.dirname(images)


def _build(preset, buckets, ckpt, workdir, extra):
    from library.training.args import parse_args
    from library.training.build import build_training, load_models
    from library.training.plan import prepare
    (resolution, low, high, step), sizes = GEOMETRY[preset]
    _, args = parse_args([
        "--pretrained_model_name_or_path", ckpt, "--train_data_dir",
        _dataset(workdir, sizes[:buckets]), "--resolution", str(resolution), "--enable_bucket",
        "--min_bucket_reso", str(low), "--max_bucket_reso", str(high), "--bucket_reso_steps",
        str(step), "--caption_extension", ".txt", "--network_module", "networks.lora",
        "--network_dim", "8", "--network_train_unet_only", "--cache_latents",
        "--cache_text_encoder_outputs", "--output_dir", os.path.join(workdir, "out"),
        "--learning_rate", "1e-4", "--max_data_loader_n_workers", "0", "--seed", "0", *extra])
    plan = prepare(args)
    if preset == "tiny":
        models = load_models(args)
    else:     # no checkpoint for medium: the tiny file only passes prepare()'s check
        from library.models import build_sdxl
        models = build_sdxl(preset)
        for cell in (models.unet, models.text_encoder1, models.text_encoder2, models.vae):
            for p in cell.get_parameters():
                p.requires_grad = False
    return plan, build_training(plan, models)


class _NoLog:
    def event(self, *_, **__):
        pass


def _graphs(preset, buckets, ckpt, extra):
    """(inputs, step function, CompileRecord, seconds to the end of the first step)."""
    import mindspore as ms
    from library.training.compile import representative_inputs, step_graphs
    with tempfile.TemporaryDirectory(prefix="compile_bench_") as workdir:
        plan, t = _build(preset, buckets, ckpt, workdir, extra)
        inputs = representative_inputs(
            plan.train_group, plan.args.seed,
            dict(latent_cache=t.latent_cache, text_cache=t.text_cache), t.assembler)
    accumulation = ms.Tensor(1.0, ms.float32)
    lrs = ms.Tensor(t.schedule.lrs(0))
    start = time.perf_counter()
    grad_fn, apply_fn, record = step_graphs(plan, t, accumulation, _NoLog())

    def step(x):
        t0 = time.perf_counter()
        float(grad_fn(*x)[0].asnumpy())
        float(apply_fn(lrs, accumulation).asnumpy())
        return time.perf_counter() - t0

    step(inputs[0])
    return inputs, step, record, time.perf_counter() - start


def run_case(preset, buckets, mode, ckpt, steps, cache_dir):
    from library import device
    device.configure()
    if mode == "cached":
        inputs, step, record, first = _graphs(preset, buckets, ckpt,
                                              ["--compile_cache_dir", cache_dir])
        rows = {"cached": (record, first, [statistics.median(step(x) for _ in range(steps))
                                           for x in inputs])}
    else:
        runs = {"static": _graphs(preset, buckets, ckpt, ["--static_shapes",
                                                          "--compile_all_buckets_first",
                                                          "--no_compile_cache"]),
                "dynamic": _graphs(preset, buckets, ckpt, ["--no_compile_cache"])}
        times = {name: [[] for _ in range(buckets)] for name in runs}
        for name, (inputs, step, _, _) in runs.items():
            for x in inputs:
                step(x)     # each shape's first step
        for _ in range(steps):
            for i in range(buckets):
                for name, (inputs, step, _, _) in runs.items():
                    times[name][i].append(step(inputs[i]))
        rows = {name: (record, first, [statistics.median(t) for t in times[name]])
                for name, (_, _, record, first) in runs.items()}
    for name, (record, first, per_shape) in rows.items():
        print(json.dumps(dict(preset=preset, buckets=buckets, mode=name, graphs=record.graphs,
                              hits=record.hits, compile=record.seconds, to_first_step=first,
                              per_shape=per_shape)), flush=True)


def _case(args, ckpt, preset, buckets, mode, cache_dir=""):
    """The rows (dicts) a case process prints."""
    proc = subprocess.run([sys.executable, __file__, "--case", f"{preset},{buckets},{mode}",
                           "--ckpt", ckpt, "--steps", str(args.steps), "--cache-dir", cache_dir],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode or not lines:
        sys.exit(f"case {preset} {buckets} {mode} failed:\n{proc.stdout[-3000:]}\n"
                 f"{proc.stderr[-3000:]}")
    for line in lines:
        print(line, file=sys.stderr, flush=True)
    return [json.loads(x) for x in lines]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default="tiny,medium")
    parser.add_argument("--buckets", default="1,3,6")
    parser.add_argument("--modes", default="ab,cached")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per bucket shape")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        preset, buckets, mode = args.case.split(",")
        run_case(preset, int(buckets), mode, args.ckpt, args.steps, args.cache_dir)
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="compile_bench_ckpt_") as tmp:
        ckpt = os.path.join(tmp, "tiny.safetensors")
        subprocess.run([sys.executable, os.path.join(ROOT, "tools/make_tiny_sdxl.py"), "--out", ckpt,
                        "--seed", "0"], check=True, capture_output=True,
                       env=dict(os.environ, PYTHONPATH=ROOT))
        for preset in args.presets.split(","):
            for buckets in map(int, args.buckets.split(",")):
                row = {}
                for mode in args.modes.split(","):
                    if mode == "cached":
                        cache = os.path.join(tmp, f"cache-{preset}-{buckets}")
                        row["cold"] = _case(args, ckpt, preset, buckets, mode, cache)[0]
                        row["cached"] = _case(args, ckpt, preset, buckets, mode, cache)[0]
                        shutil.rmtree(cache)
                    else:
                        row.update({r["mode"]: r for r in _case(args, ckpt, preset, buckets,
                                                                  mode)})
                rows.append((preset, buckets, row))
    print("| preset | buckets | mode | graphs (cache hits) | compile (s) | to first step (s) "
          "| s/step per bucket shape |")
    print("|---|---|---|---|---|---|---|")
    for preset, buckets, row in rows:
        for mode, r in row.items():
            label = {"cold": "cached, first run", "cached": "cached, repeated run"}.get(mode, mode)
            print(f"| {preset} | {buckets} | {label} | {r['graphs']} ({r['hits']}) "
                  f"| {r['compile']:.1f} | {r['to_first_step']:.1f} "
                  f"| {', '.join(f'{s:.2f}' for s in r['per_shape'])} |")
    for preset, buckets, row in rows:
        if "static" in row and "dynamic" in row:
            ratio = statistics.mean(d / s for d, s in zip(row["dynamic"]["per_shape"],
                                                          row["static"]["per_shape"]))
            print(f"{preset}, {buckets} bucket(s): dynamic s/step / static = {ratio:.2f}; "
                  f"compile static {row['static']['compile']:.1f} s, dynamic "
                  f"{row['dynamic']['compile']:.1f} s", end="")
            if "cached" in row:
                share = row["cached"]["to_first_step"] / row["dynamic"]["compile"]
                print(f"; repeated run to first step = {share:.0%} of the dynamic compile", end="")
            print()


if __name__ == "__main__":
    main()
