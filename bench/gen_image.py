"""Benchmark: sdxl_gen_img's pipeline, seconds per image and graph compile time, as a table.

    python bench/gen_image.py [--size 256] [--steps 20] [--images 2] [--presets tiny,medium]
                              [--torch-python PATH | --no-torch]

Cases (each in its own process): the tiny preset (the test checkpoint, seed 0) and "medium" (SDXL's
topology -- levels, depths, heads of 64/4 channels -- at a quarter of its width, random weights), each
with the guided UNet step compiled and in PyNative; euler, CFG 7.5 (batched 2B), batch 1. Compiled
modes: `graph`, the default (every image has one shape, so the pipeline compiles that shape's
graph), `graph-open` (the warm-up call also asks for an image 64 px smaller, so the run takes the
one graph for every shape; compile then covers that graph alone) and `graph-static`
(--static_shapes: a graph per shape).
s/image excludes compile time (one warm-up image first). Then diffusers' StableDiffusionXLPipeline
(PyTorch, CPU) on the same tiny weights written as a diffusers folder, with EulerDiscreteScheduler,
for the ratio. PyTorch runs with --torch-threads (default 1), MindSpore with --ms-threads (0: its
default; see bench/_bench_venv.py). The PyTorch side
runs in its own venv: --torch-python, or .venv-bench (created on first use with pinned torch,
diffusers and transformers, see bench/_bench_venv.py; git-ignored).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _bench_venv import bench_python, set_mindspore_threads, thread_env  # noqa: E402

THREADS = (1, 0)      # (--torch-threads, --ms-threads) of every case

PROMPT = "a red circle and a blue square on a white background"


def _models(preset, ckpt):
    if preset == "tiny":
        from library.models import load_sdxl
        return load_sdxl(ckpt)
    from library.models import build_sdxl
    return build_sdxl(preset)     # library.models.config.MEDIUM, random weights


def run_case(preset, mode, size, steps, images, ckpt):
    sys.path.insert(0, ROOT)
    from library import device
    device.configure(parallel_dispatch=False)       # as sdxl_gen_img does
    set_mindspore_threads()
    from library.generation.pipeline import Pipeline
    from library.generation.requests import GenerationOptions, ImageRequest
    models = _models(preset, ckpt)
    pipe = Pipeline(models, GenerationOptions(compile=mode != "pynative",
                                              static_shapes=mode == "graph-static"))
    req = dict(width=size, height=size, steps=steps, sampler="euler", scale=7.5)
    warm_up = [ImageRequest(PROMPT, seed=0, **req)]
    if mode == "graph-open":
        warm_up.append(ImageRequest(PROMPT, seed=0, **dict(req, width=size - 64)))
    start = time.perf_counter()
    pipe.generate(warm_up)
    first = time.perf_counter() - start
    start = time.perf_counter()
    pipe.generate([ImageRequest(PROMPT, seed=i + 1, **req) for i in range(images)])
    per_image = (time.perf_counter() - start) / images
    compile_s = pipe.stats.compile_seconds if mode != "pynative" else 0.0
    print(json.dumps(dict(first=first, per_image=per_image, compile=compile_s,
                          step_ms=pipe.stats.median_step * 1000)), flush=True)


TORCH_CASE = r"""
import json, sys, time, torch
from diffusers import StableDiffusionXLPipeline, EulerDiscreteScheduler
folder, size, steps, images = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(int(sys.argv[5]))
pipe = StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=torch.float32)
pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
pipe.set_progress_bar_config(disable=True)
kw = dict(height=size, width=size, num_inference_steps=steps, guidance_scale=7.5, output_type="pil")
prompt = "a red circle and a blue square on a white background"
pipe(prompt, generator=torch.Generator().manual_seed(0), **kw)
start = time.perf_counter()
for i in range(images):
    pipe(prompt, generator=torch.Generator().manual_seed(i + 1), **kw)
print(json.dumps(dict(per_image=(time.perf_counter() - start) / images, torch=torch.__version__)))
"""


def _child(args):
    proc = subprocess.run(args, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=ROOT, **thread_env(*THREADS)))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(lines[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--presets", default="tiny,medium")
    p.add_argument("--modes", default="graph,pynative",
                   help="of graph (the default: one shape, its own graph), graph-open (the one "
                        "graph for every shape), graph-static (sdxl_gen_img --static_shapes), "
                        "pynative")
    p.add_argument("--torch-python", default=None)
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="PyTorch's threads (default 1; see bench/_bench_venv.py)")
    p.add_argument("--ms-threads", type=int, default=0,
                   help="MindSpore's CPU kernel threads (default 0: MindSpore's default)")
    p.add_argument("--case", nargs=3, help=argparse.SUPPRESS)   # internal: preset mode ckpt
    args = p.parse_args()
    if args.case:
        return run_case(args.case[0], args.case[1], args.size, args.steps, args.images, args.case[2])

    global THREADS
    THREADS = (args.torch_threads, args.ms_threads)
    tmp = tempfile.mkdtemp(prefix="gen_bench_")
    ckpt = os.path.join(tmp, "tiny.safetensors")
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_tiny_sdxl.py"), "--out", ckpt,
                    "--seed", "0"], check=True, capture_output=True)
    rows = []
    for preset in args.presets.split(","):
        for mode in args.modes.split(","):
            r = _child([sys.executable, os.path.abspath(__file__), "--size", str(args.size), "--steps",
                        str(args.steps), "--images", str(args.images), "--case", preset, mode, ckpt])
            rows.append((preset, f"MindSpore {mode}", r))
            print(preset, mode, r, file=sys.stderr, flush=True)
    torch_row = None
    if not args.no_torch:
        sys.path.insert(0, ROOT)
        from library.models import load_sdxl
        from library.models.checkpoint import save_diffusers_folder
        folder = os.path.join(tmp, "tiny_diffusers")
        save_diffusers_folder(load_sdxl(ckpt), folder)
        script = os.path.join(tmp, "torch_case.py")
        with open(script, "w") as f:
            f.write(TORCH_CASE)
        python = args.torch_python or bench_python()
        torch_row = _child([python, script, folder, str(args.size), str(args.steps), str(args.images),
                            str(args.torch_threads)])
        rows.append(("tiny", f"diffusers (PyTorch {torch_row.get('torch', '?')}) CPU", torch_row))

    ref = torch_row.get("per_image") if torch_row and "per_image" in torch_row else None
    print(f"\nSDXL generation, {args.size}x{args.size}, {args.steps} euler steps, CFG 7.5, batch 1, "
          f"CPU ({os.cpu_count()} cores), PyTorch {args.torch_threads} thread(s), MindSpore "
          f"{args.ms_threads or 'default'} kernel threads, load "
          f"average {os.getloadavg()[0]:.1f} at the end\n")
    print("| preset | backend | compile (s) | s/image | ms per UNet step (2B) | vs diffusers |")
    print("|---|---|---|---|---|---|")
    for preset, backend, r in rows:
        if "error" in r:
            print(f"| {preset} | {backend} | – | failed: {r['error']} | – | – |")
            continue
        ratio = f"{r['per_image'] / ref:.2f}x" if ref and preset == "tiny" else "–"
        comp = f"{r['compile']:.1f}" if r.get("compile") else "–"
        step = f"{r['step_ms']:.0f}" if r.get("step_ms") else "–"
        print(f"| {preset} | {backend} | {comp} | {r['per_image']:.2f} | {step} | {ratio} |")


if __name__ == "__main__":
    main()
