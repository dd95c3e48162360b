"""Benchmark: what compiling costs a run, static per-shape graphs against the one dynamic-shape
graph, and a repeated run with the compile cache, as a table.

    python bench/compile_step.py [--presets tiny,medium] [--buckets 1,3,6] [--steps 3]
                                 [--modes static,dynamic,cached]

Each case runs in its own process and builds the real run in-process from the trainer's own
arguments (`--network_dim 8 --network_train_unet_only --cache_latents
--cache_text_encoder_outputs`, AdamW, float32, batch 1) on a dataset with one image per bucket
shape, then makes its step graphs with the trainer's own `step_graphs`:
- `static`: `--static_shapes --compile_all_buckets_first --no_compile_cache` (a grad graph per
  bucket, then the apply graph, all before step 1);
- `dynamic`: `--no_compile_cache` (one grad graph for every shape, and the apply graph);
- `cached`: the dynamic run twice with a fresh `--compile_cache_dir`; the row is the second run,
  whose graphs come from the cache.
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
    from library.training.loop import build_training, load_models, prepare
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


def run_case(preset, buckets, mode, ckpt, steps, cache_dir):
    import mindspore as ms
    from library import device
    from library.training.compile import representative_inputs, step_graphs
    device.configure()
    extra = {"static": ["--static_shapes", "--compile_all_buckets_first", "--no_compile_cache"],
             "dynamic": ["--no_compile_cache"], "cached": ["--compile_cache_dir", cache_dir]}[mode]
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
    to_first_step = time.perf_counter() - start
    per_shape = []
    for x in inputs:
        step(x)         # this shape's first step (the dynamic graph sizes its buffers)
        per_shape.append(statistics.median(step(x) for _ in range(steps)))
    print(json.dumps(dict(preset=preset, buckets=len(inputs), mode=mode, graphs=record.graphs,
                          hits=record.hits, compile=record.seconds, to_first_step=to_first_step,
                          per_shape=per_shape)), flush=True)


def _case(args, ckpt, preset, buckets, mode, cache_dir=""):
    proc = subprocess.run([sys.executable, __file__, "--case", f"{preset},{buckets},{mode}",
                           "--ckpt", ckpt, "--steps", str(args.steps), "--cache-dir", cache_dir],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode or not lines:
        sys.exit(f"case {preset} {buckets} {mode} failed:\n{proc.stdout[-3000:]}\n"
                 f"{proc.stderr[-3000:]}")
    print(lines[-1], file=sys.stderr, flush=True)
    return json.loads(lines[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default="tiny,medium")
    parser.add_argument("--buckets", default="1,3,6")
    parser.add_argument("--modes", default="static,dynamic,cached")
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
                        cold = _case(args, ckpt, preset, buckets, mode, cache)
                        row["cold"] = cold
                        row[mode] = _case(args, ckpt, preset, buckets, mode, cache)
                        shutil.rmtree(cache)
                    else:
                        row[mode] = _case(args, ckpt, preset, buckets, mode)
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
