"""Per-operator profile of the LoRA grad step (MindSpore graph mode) and of PyTorch eager's.

    python bench/profile_step.py --preset tiny --latent 64 [--steps 3] [--top 25]
                                 [--dynamic] [--side ms|torch|both]

The MindSpore side builds the same run as bench/train_step.py (the trainer's own arguments,
`prepare` -> `build_training`), compiles the grad step (static shapes, or the trainer's
dynamic-shape signature with --dynamic), runs one warm-up step, then --steps steps under
mindspore.Profiler (CPU op timing) and prints the operator types by total time per step, then the
kernels grouped by type, input shapes and forward/backward.
The PyTorch side is bench/train_step.py's eager step under torch.profiler (self CPU time per
op). Both tables are per step; the sums are the time the kernels account for.
"""

import argparse
import collections
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.environ.get("BENCH_LIBRARY", ROOT))


def run_ms(preset, latent, steps, dynamic, top, outdir):
    """Build, compile, warm up, then profile `steps` grad steps into `outdir`."""
    import mindspore as ms
    from library import device
    from library.training.batches import to_tensors
    from library.training.step import dynamic_signature
    from train_step import build_run
    device.configure()
    with tempfile.TemporaryDirectory(prefix="prof_") as workdir:
        ckpt = os.path.join(workdir, "tiny.safetensors")
        subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_tiny_sdxl.py"), "--out",
                        ckpt, "--seed", "0"], check=True, capture_output=True)
        t = build_run(preset, latent, ckpt, workdir, steps)
        batch = next(iter(t.loader.epoch(1)))
        t.loader.close()
    inputs = [to_tensors(t.assembler(batch)[0]) for _ in range(steps + 2)]
    if dynamic:
        t.grad_step.set_inputs(*dynamic_signature(inputs[0], t.grad_step.layout))
    grad_fn = ms.jit(t.grad_step.construct)
    t0 = time.perf_counter()
    float(grad_fn(*inputs[0])[0].asnumpy())
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(2):
        t0 = time.perf_counter()
        float(grad_fn(*inputs[1 + i])[0].asnumpy())
        times.append(time.perf_counter() - t0)
    print(f"compile+first {compile_s:.1f} s; unprofiled steps {[round(x, 3) for x in times]}",
          flush=True)
    profiler = ms.Profiler(output_path=outdir)
    t0 = time.perf_counter()
    for i in range(steps):
        float(grad_fn(*inputs[i % len(inputs)])[0].asnumpy())
    wall = (time.perf_counter() - t0) / steps
    profiler.analyse()
    print(f"profiled steps: {wall:.3f} s/step", flush=True)
    return wall


def summarize_ms(outdir, steps, top):
    """Print the profiled steps' kernels by type, then by (type, input shapes, forward/backward).

    The CPU profiler writes each kernel launch's start and duration per kernel name
    (cpu_op_execute_timestamp) and, in launch order, its input shapes (cpu_framework): sorted by
    start time the two line up one to one."""
    folder = glob.glob(os.path.join(outdir, "*", "FRAMEWORK"))[0]
    launches = []
    with open(os.path.join(folder, "cpu_op_execute_timestamp_0.txt")) as f:
        for line in f:
            name, _, rest = line.strip().split(";", 2)
            for item in rest.split():
                start, dur, _ = item.split(",")
                launches.append((int(start), name, float(dur)))
    launches.sort()
    with open(os.path.join(folder, "cpu_framework_0.txt")) as f:
        shapes = [line.strip().split(";") for line in f]
    by_type = collections.defaultdict(lambda: [0.0, 0])
    by_shape = collections.defaultdict(lambda: [0.0, 0])
    for (_, name, dur), info in zip(launches, shapes):
        kind = name.split("/")[-1].rsplit("-op", 1)[0]
        by_type[kind][0] += dur
        by_type[kind][1] += 1
        if info[0] != kind:
            continue
        inputs = " ".join(x.split(":", 1)[1] for x in info[3:]
                          if x and "NoShape" not in x and "Tuple" not in x)
        side = "bwd" if name.startswith("Gradients") or "Expand/_" in name else "fwd"
        by_shape[(kind, side, inputs)][0] += dur
        by_shape[(kind, side, inputs)][1] += 1
    total = sum(t for t, _ in by_type.values())
    print(f"\nMindSpore kernels: {total / steps:.0f} ms/step, "
          f"{sum(n for _, n in by_type.values()) // steps} launches/step")
    print("| op | ms/step | calls/step | share |")
    print("|---|---|---|---|")
    for kind, (t, n) in sorted(by_type.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"| {kind} | {t / steps:.1f} | {n // steps} | {t / total:.1%} |")
    print("\n| op | side | input shapes | ms/step | calls/step |")
    print("|---|---|---|---|---|")
    for (kind, side, inputs), (t, n) in sorted(by_shape.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"| {kind} | {side} | {inputs} | {t / steps:.1f} | {n // steps} |")


TORCH_CASE = r'''
import json, math, sys, time
import torch
from torch import nn
from diffusers import UNet2DConditionModel
config, latent, steps, rank, top = json.load(open(sys.argv[1])), int(sys.argv[2]), int(sys.argv[3]), 8, int(sys.argv[4])
torch.manual_seed(0)
unet = UNet2DConditionModel.from_config(config)
unet.requires_grad_(False)
unet.train()
class LoRA(nn.Module):
    def __init__(self, org, rank, alpha=1.0):
        super().__init__()
        self.down = nn.Linear(org.in_features, rank, bias=False)
        self.up = nn.Linear(rank, org.out_features, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        self.scale = alpha / rank
        self.org_forward = org.forward
        org.forward = self.forward
    def forward(self, x):
        return self.org_forward(x) + self.up(self.down(x)) * self.scale
loras = [LoRA(m, rank) for block in unet.modules() if type(block).__name__ == "Transformer2DModel"
         for m in block.modules() if isinstance(m, nn.Linear)]
params = [p for l in loras for p in l.parameters()]
betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
alphas_cumprod = torch.cumprod(1 - betas, 0).float()
pooled_dim = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
latents = torch.randn(1, 4, latent, latent)
context = torch.randn(1, 77, config["cross_attention_dim"])
cond = {"text_embeds": torch.randn(1, pooled_dim),
        "time_ids": torch.tensor([[latent * 8, latent * 8, 0, 0, latent * 8, latent * 8]], dtype=torch.float32)}
def step():
    noise = torch.randn_like(latents)
    t = torch.randint(0, 1000, (1,))
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    pred = unet(noisy, t, context, added_cond_kwargs=cond).sample
    loss = nn.functional.mse_loss(pred.float(), noise, reduction="none").mean([1, 2, 3]).mean()
    loss.backward()
    for p in params:
        p.grad = None
for _ in range(2):
    step()
t0 = time.perf_counter()
for _ in range(steps):
    step()
print(f"unprofiled grad step {(time.perf_counter() - t0) / steps:.3f} s (threads {torch.get_num_threads()})")
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(steps):
        step()
ka = prof.key_averages()
total = sum(e.self_cpu_time_total for e in ka)
print(f"sum of self CPU time: {total / steps / 1e6:.3f} s/step")
print("| op | self ms/step | calls/step | share |")
print("|---|---|---|---|")
for e in sorted(ka, key=lambda e: -e.self_cpu_time_total)[:top]:
    print(f"| {e.key} | {e.self_cpu_time_total / steps / 1e3:.1f} | {e.count / steps:.0f} | {e.self_cpu_time_total / total:.1%} |")
'''


def run_torch(preset, latent, steps, top):
    from _bench_venv import bench_python
    from library.models.config import get_preset
    from library.models.diffusers_config import _unet
    with tempfile.TemporaryDirectory(prefix="prof_torch_") as tmp:
        config = os.path.join(tmp, "unet.json")
        with open(config, "w") as f:
            json.dump(_unet(get_preset(preset)), f)
        script = os.path.join(tmp, "case.py")
        with open(script, "w") as f:
            f.write(TORCH_CASE)
        subprocess.run([bench_python(), script, config, str(latent), str(steps), str(top)],
                       check=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="tiny")
    p.add_argument("--latent", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--dynamic", action="store_true")
    p.add_argument("--side", default="both")
    p.add_argument("--outdir", default=None, help="the MindSpore profiler's folder (default: a temp dir)")
    p.add_argument("--summarize", default=None, help="only summarize this profiler folder")
    args = p.parse_args()
    if args.summarize:
        return summarize_ms(args.summarize, args.steps, args.top)
    if args.side in ("ms", "both"):
        outdir = args.outdir or tempfile.mkdtemp(prefix="ms_prof_")
        run_ms(args.preset, args.latent, args.steps, args.dynamic, args.top, outdir)
        summarize_ms(outdir, args.steps, args.top)
    if args.side in ("torch", "both"):
        run_torch(args.preset, args.latent, args.steps, args.top)


if __name__ == "__main__":
    main()
