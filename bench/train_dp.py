"""Benchmark: data parallelism with msrun, 1 worker against N, on the real trainer, as a table.

    python bench/train_dp.py [--workers 1,2] [--steps 8] [--resolution 64] [--images 8]

Each case runs `msrun --worker_num=N --local_worker_num=N sdxl_train_network.py ...` on the
tiny test checkpoint (made on first use in a temporary folder): a synthetic dataset of --images
square images, batch 1 per worker, `--network_dim 8 --network_train_unet_only --cache_latents
--cache_text_encoder_outputs`, AdamW, graph mode. The numbers come from rank 0's step log:

    s/step     median over the steps after the first of `seconds_per_step` (grad step, the
               loss's mean over the ranks, apply step with its gradient AllReduce)
    images/s   N x batch / s/step: the whole group's throughput
    compile    the first step minus the median (both step graphs, compiled on every worker)
    wall       msrun's whole run: start-up, model load, caching, compile, steps, save

The venv's bin goes first on PATH: msrun starts the workers with the `python` it finds there.
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dataset(folder, count, size):
    from PIL import Image, ImageDraw
    images = os.path.join(folder, "img", "1_bench")
    os.makedirs(images, exist_ok=True)
    for i in range(count):
        img = Image.new("RGB", (size, size), "white")
        ImageDraw.Draw(img).ellipse([size * 0.1 + i, size * 0.2, size * 0.8, size * 0.9 - i],
                                    fill=(200, 30 * (i % 8), 40))
        img.save(os.path.join(images, f"{i}.png"))
        with open(os.path.join(images, f"{i}.txt"), "w") as f:
            f.write(f"a circle, number {i}")
    return os.path.dirname(images)


def run_case(workers, ckpt, data, out, steps, resolution):
    bindir = os.path.dirname(sys.executable)
    env = dict(os.environ, PYTHONPATH=ROOT, PATH=bindir + os.pathsep + os.environ["PATH"])
    cmd = [os.path.join(bindir, "msrun"), f"--worker_num={workers}", f"--local_worker_num={workers}",
           f"--master_port={_free_port()}", "--join=True", f"--log_dir={out}/msrun_logs",
           "sdxl_train_network.py", "--pretrained_model_name_or_path", ckpt, "--train_data_dir", data,
           "--resolution", str(resolution), "--caption_extension", ".txt",
           "--network_module", "networks.lora", "--network_dim", "8", "--network_train_unet_only",
           "--cache_latents", "--cache_text_encoder_outputs", "--max_data_loader_n_workers", "0",
           "--train_batch_size", "1", "--max_train_steps", str(steps), "--seed", "1",
           "--output_dir", out, "--output_name", "bench"]
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.time() - start
    if proc.returncode != 0:
        sys.exit(f"msrun with {workers} worker(s) failed; see {out}/msrun_logs\n{proc.stderr[-2000:]}")
    records = [json.loads(line) for line in open(os.path.join(out, "bench_log.jsonl"))]
    seconds = [r["seconds_per_step"] for r in records if "step" in r and "event" not in r]
    median = statistics.median(seconds[1:])
    return {"workers": workers, "s_step": median, "images_s": workers / median,
            "compile": seconds[0] - median, "wall": wall, "steps": len(seconds)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--images", type=int, default=8)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "tiny.safetensors")
        subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_tiny_sdxl.py"), "--out", ckpt,
                        "--seed", "0"], check=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                       capture_output=True)
        data = _dataset(tmp, args.images, args.resolution)
        rows = []
        for n in (int(x) for x in args.workers.split(",")):
            out = os.path.join(tmp, f"out{n}")
            rows.append(run_case(n, ckpt, data, out, args.steps, args.resolution))
            print(f"  {n} worker(s) done", file=sys.stderr, flush=True)
    print(f"tiny model, {args.resolution}px, batch 1 per worker, {args.steps} steps, "
          f"{os.cpu_count()} CPU cores")
    print(f"{'workers':>7} | {'s/step':>7} | {'images/s':>8} | {'compile s':>9} | {'wall s':>7}")
    print("-" * 50)
    for r in rows:
        print(f"{r['workers']:>7} | {r['s_step']:>7.3f} | {r['images_s']:>8.2f} | {r['compile']:>9.1f} | "
              f"{r['wall']:>7.1f}")


if __name__ == "__main__":
    main()
