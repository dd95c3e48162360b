"""Benchmark: compile time of the train step per bucket shape, and ms.jit options, as a table.

    python bench/compile_step.py [--cases O0,O1,strict,ahead] [--buckets 3] [--steps 2]

Each case runs in its own process (so nothing is cached between cases) and builds the real run
in-process from the trainer's own arguments, on the tiny checkpoint: one image per bucket, up to
three buckets (latents 8x8, 4x12 and 4x16; --buckets), `--network_train_unet_only
--cache_latents --cache_text_encoder_outputs`, AdamW, float32, batch 1.

Cases: `O0` (ms.jit's default, what the trainer uses), `O1` (jit_level="O1"), `strict`
(fullgraph=True, i.e. jit_syntax_level STRICT): the first call at each bucket shape, minus the
median later step, is that shape's compile time; the apply step likewise. `ahead` compiles every
graph without running it (library.training.compile.StepGraph.compile, as
--compile_all_buckets_first does) and then times the first real step. The loss column is the sum
of each bucket's first loss: equal values mean the option changes nothing numerically.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SIZES = [(64, 64), (96, 32), (128, 32)]     # three buckets at resolution 64, steps 32


def _dataset(folder, buckets):
    from PIL import Image, ImageDraw
    images = os.path.join(folder, "img", "1_bench")
    os.makedirs(images)
    for i, (w, h) in enumerate(SIZES[:buckets]):
        img = Image.new("RGB", (w, h), "white")
        ImageDraw.Draw(img).ellipse([w * 0.2, h * 0.2, w * 0.8, h * 0.8], fill=(210, 40, 40))
        img.save(os.path.join(images, f"{i}.png"))
        with open(os.path.join(images, f"{i}.txt"), "w") as f:
            f.write("a red circle")
    return os.path.dirname(images)


def run_case(case, ckpt, steps, buckets):
    import mindspore as ms
    from library import device
    from library.training.args import parse_args
    from library.training.compile import StepGraph, representative_inputs
    from library.training.loop import build_training, load_models, prepare
    device.configure()
    with tempfile.TemporaryDirectory(prefix="compile_bench_") as workdir:
        _, args = parse_args([
            "--pretrained_model_name_or_path", ckpt, "--train_data_dir", _dataset(workdir, buckets),
            "--resolution", "64", "--enable_bucket", "--min_bucket_reso", "32",
            "--max_bucket_reso", "128", "--bucket_reso_steps", "32",
            "--caption_extension", ".txt", "--network_module", "networks.lora",
            "--network_dim", "8", "--network_train_unet_only", "--cache_latents",
            "--cache_text_encoder_outputs", "--output_dir", os.path.join(workdir, "out"),
            "--learning_rate", "1e-4", "--max_data_loader_n_workers", "0", "--seed", "0"])
        plan = prepare(args)
        t = build_training(plan, load_models(args))
        inputs = representative_inputs(
            plan.train_group, args.seed,
            dict(latent_cache=t.latent_cache, text_cache=t.text_cache), t.assembler)
    lrs, accumulation = ms.Tensor(t.schedule.lrs(0)), ms.Tensor(1.0, ms.float32)
    if case == "ahead":
        grad_fn, apply_fn = StepGraph(t.grad_step), StepGraph(t.apply_step)
        ahead = [grad_fn.compile(*x) for x in inputs]
        ahead_apply = apply_fn.compile(lrs, accumulation)
    else:
        options = {"O0": {}, "O1": {"jit_level": "O1"}, "strict": {"fullgraph": True}}[case]
        grad_fn = ms.jit(t.grad_step.construct, **options)
        apply_fn = ms.jit(t.apply_step.construct, **options)

    def step(x):
        t0 = time.perf_counter()
        loss = float(grad_fn(*x)[0].asnumpy())
        t1 = time.perf_counter()
        float(apply_fn(lrs, accumulation).asnumpy())
        return t1 - t0, time.perf_counter() - t1, loss

    first = [step(x) for x in inputs]          # each bucket's first call
    later = [step(x) for _ in range(steps) for x in inputs]
    grad_step = statistics.median(g for g, _, _ in later)
    apply_step = statistics.median(a for _, a, _ in later)
    if case == "ahead":
        grad_compile, apply_compile = ahead, ahead_apply
    else:
        grad_compile = [g - grad_step for g, _, _ in first]
        apply_compile = first[0][1] - apply_step
    print(json.dumps(dict(case=case, buckets=len(inputs), grad_compile=grad_compile,
                          apply_compile=apply_compile, first_step=sum(first[0][:2]),
                          step=grad_step + apply_step,
                          loss=sum(loss for _, _, loss in first))), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="O0,O1,strict,ahead")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per bucket after the first")
    parser.add_argument("--buckets", type=int, default=3, choices=[1, 2, 3])
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        run_case(args.case, args.ckpt, args.steps, args.buckets)
        return
    with tempfile.TemporaryDirectory(prefix="compile_bench_ckpt_") as tmp:
        ckpt = os.path.join(tmp, "tiny.safetensors")
        subprocess.run([sys.executable, os.path.join(ROOT, "tools/make_tiny_sdxl.py"), "--out", ckpt,
                        "--seed", "0"], check=True, capture_output=True,
                       env=dict(os.environ, PYTHONPATH=ROOT))
        rows = []
        for case in args.cases.split(","):
            proc = subprocess.run([sys.executable, __file__, "--case", case, "--ckpt", ckpt,
                                   "--steps", str(args.steps), "--buckets", str(args.buckets)], capture_output=True, text=True,
                                  env=dict(os.environ, PYTHONPATH=ROOT))
            lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
            if proc.returncode or not lines:
                sys.exit(f"case {case} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            rows.append(json.loads(lines[-1]))
            print(lines[-1], file=sys.stderr, flush=True)
    print("| case | grad step compile per bucket (s) | apply step compile (s) | "
          "first step after compile (s) | s/step | loss (sum of first losses) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        per = r["grad_compile"]
        print(f"| {r['case']} | {statistics.mean(per):.1f} ({', '.join(f'{x:.1f}' for x in per)}) "
              f"| {r['apply_compile']:.1f} | {r['first_step']:.2f} | {r['step']:.2f} "
              f"| {r['loss']:.6f} |")


if __name__ == "__main__":
    main()
