"""Benchmark: the LoRA train step (grad step + apply step, as sdxl_train_network runs them), as a table.

    python bench/train_step.py [--steps 5] [--pynative-steps 2] [--tiny-latent 64]
                               [--medium-latent 32] [--presets tiny,medium]
                               [--modes graph,pynative] [--torch-python PATH | --no-torch]
                               [--no-synthetic] [--apply-only] [--library TREE]
                               [--torch-threads 1] [--ms-threads 0]

Each case runs in its own process and reports its peak RSS. The MindSpore cases build the real
run in-process: a one-image synthetic dataset is drawn, parsed with the trainer's own arguments
(`--network_dim 8 --network_train_unet_only --cache_latents --cache_text_encoder_outputs`,
AdamW, `--max_grad_norm 1`, float32, batch 1), and `prepare` -> `build_training` make the
GradStep and ApplyStep; graph mode runs `ms.jit(grad_step.construct)` and
`ms.jit(apply_step.construct)` as `train` does, PyNative calls the Cells. s/step is the median
over --steps steps after one warm-up step (PyNative: --pynative-steps, default 2, since its steps
are slow); compile is the warm-up step minus the median step. Presets: `tiny` (the test
checkpoint) and `medium` (library.models.config.MEDIUM: SDXL's topology at a quarter of its width,
random weights).

The PyTorch row for each preset is the same step in eager mode: diffusers' UNet2DConditionModel
built from the same config (library.models.diffusers_config), a hand-written LoRA (kohya's: rank
8, alpha 1, on every Linear inside the Transformer2DModel blocks, the same targets), MSE on the
noise, clip_grad_norm_(1.0), torch.optim.AdamW. It runs in .venv-bench (created on first use with
torch==2.13.0, diffusers==0.35.2, transformers==4.57.1; git-ignored), or --torch-python.
PyTorch runs with --torch-threads threads (default 1), MindSpore with --ms-threads (default 0,
its own default); why: bench/_bench_venv.py.

A second table (alone with --apply-only) is the apply step by itself, each case in its own
process: compile time, median and fastest call, and the operator count of its compiled graph
(library.training.graph_stats), for each preset's real run and for a synthetic run with the LoRA
of full-size SDXL (every module kohya makes with conv_dim, TE1 + TE2 + UNet, 2,104 tensors, rank
8; shapes from tests/fixtures/kohya_sdxl_lora_keys_conv_dim.tsv); the gradient buffers hold
random values instead of a grad step's. --library measures another source tree with this file,
e.g. the per-tensor apply step before the flat layout:
`git worktree add /tmp/before da24e02; python bench/train_step.py --apply-only --library /tmp/before`.
"""

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# the tree whose library is measured: this one, or --library's (passed to the case processes)
sys.path.insert(0, os.environ.get("BENCH_LIBRARY", ROOT))

from _bench_venv import bench_python, set_mindspore_threads, thread_env  # noqa: E402

RANK = 8
CAPTION = "a red circle on a white background"
LORA_KEYS = os.path.join(ROOT, "tests", "fixtures", "kohya_sdxl_lora_keys_conv_dim.tsv")


def _peak_rss_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20   # KiB on Linux


def _draw_dataset(folder, size):
    from PIL import Image, ImageDraw
    images = os.path.join(folder, "img", "1_bench")
    os.makedirs(images, exist_ok=True)
    img = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(img).ellipse([size * 0.2, size * 0.2, size * 0.8, size * 0.8], fill=(210, 40, 40))
    img.save(os.path.join(images, "a.png"))
    with open(os.path.join(images, "a.txt"), "w") as f:
        f.write(CAPTION)
    return os.path.dirname(images)


def build_run(preset, latent, ckpt, workdir, steps):
    """The trainer's Training for this preset and latent size, from its own argument parser."""
    from library.training.args import parse_args
    from library.training.build import build_training, load_models
    from library.training.plan import prepare
    data = _draw_dataset(workdir, latent * 8)
    # medium has no checkpoint (random weights): the tiny file only passes prepare()'s check
    _, args = parse_args([
        "--pretrained_model_name_or_path", ckpt, "--train_data_dir", data,
        "--resolution", str(latent * 8), "--caption_extension", ".txt",
        "--network_module", "networks.lora", "--network_dim", str(RANK),
        "--network_train_unet_only", "--cache_latents", "--cache_text_encoder_outputs",
        "--output_dir", os.path.join(workdir, "out"), "--max_train_steps", str(steps + 1),
        "--learning_rate", "1e-4", "--max_data_loader_n_workers", "0", "--seed", "0"])
    plan = prepare(args)
    if preset == "tiny":
        models = load_models(args)
    else:
        from library.models import build_sdxl
        models = build_sdxl(preset)
        for cell in (models.unet, models.text_encoder1, models.text_encoder2, models.vae):
            for p in cell.get_parameters():
                p.requires_grad = False
    return build_training(plan, models)


def run_case(preset, mode, latent, steps, ckpt):
    import mindspore as ms
    import numpy as np
    from library import device
    from library.training.batches import to_tensors
    device.configure()
    set_mindspore_threads()
    with tempfile.TemporaryDirectory(prefix="train_bench_") as workdir:
        t = build_run(preset, latent, ckpt, workdir, steps)
        batch = next(iter(t.loader.epoch(1)))
        t.loader.close()
    inputs = [to_tensors(t.assembler(batch)[0]) for _ in range(steps + 1)]
    if mode == "graph":
        t.grad_step.flat.compiled_writes = True     # as compile.step_graphs sets it
        grad_fn, apply_fn = ms.jit(t.grad_step.construct), ms.jit(t.apply_step.construct)
    else:
        grad_fn, apply_fn = t.grad_step, t.apply_step
    lrs, accumulation = ms.Tensor(t.schedule.lrs(0)), ms.Tensor(1.0, ms.float32)

    def step(i):
        t0 = time.perf_counter()
        loss, _ = grad_fn(*inputs[i])
        loss = float(loss.asnumpy())
        t1 = time.perf_counter()
        float(apply_fn(lrs, accumulation).asnumpy())
        return t1 - t0, time.perf_counter() - t1, loss

    first = step(0)
    timed = [step(i) for i in range(1, steps + 1)]
    total = statistics.median(g + a for g, a, _ in timed)
    print(json.dumps(dict(
        first=first[0] + first[1], first_grad=first[0], first_apply=first[1], step=total,
        best=min(g + a for g, a, _ in timed),
        grad=statistics.median(g for g, _, _ in timed),
        apply=statistics.median(a for _, a, _ in timed), steps=steps,
        loss=float(np.mean([x for _, _, x in timed])), rss=_peak_rss_gib(),
        lora_tensors=len(list(t.grad_step.trainable)),
        lora_values=int(sum(np.prod(p.shape) for p in t.grad_step.trainable)))), flush=True)


def _sdxl_lora_shapes(rank):
    """{kohya key: shape} of every lora_down/lora_up weight of a full-size SDXL LoRA, at `rank`."""
    shapes = {}
    with open(LORA_KEYS) as f:
        next(f)
        for line in f:
            key, shape, _ = line.rstrip("\n").split("\t")
            dims = [int(x) for x in shape.strip("()").split(",") if x.strip()]
            if key.endswith("lora_down.weight"):
                dims[0] = rank          # the file's rank is 4
            elif key.endswith("lora_up.weight"):
                dims[1] = rank
            else:
                continue
            shapes[key] = tuple(dims)
    return shapes


def _synthetic_apply_step():
    """An ApplyStep over a full-size SDXL LoRA's tensors (AdamW, max_grad_norm 1, one group per
    TE1 / TE2 / UNet) and its gradient buffers. Before the flat layout (da24e02 and older) the
    buffers were one per tensor; that case is kept so this file measures both layouts."""
    import mindspore as ms
    import numpy as np
    from library.training.optimizer_options import build_optimizer
    from library.training.optimizer_cells import ParamGroup
    from library.training.step import ApplyStep
    rng = np.random.default_rng(0)
    params = {prefix: [] for prefix in ("lora_te1", "lora_te2", "lora_unet")}
    for key, shape in _sdxl_lora_shapes(RANK).items():
        params["_".join(key.split("_")[:2])].append(ms.Parameter(
            ms.Tensor(rng.standard_normal(shape).astype(np.float32) * 0.01), name=key))
    groups = [ParamGroup(ps, 1e-4, prefix) for prefix, ps in params.items()]
    optimizer = build_optimizer(groups, 1e-4, "AdamW", []).optimizer
    if hasattr(optimizer, "layout"):
        buffers = optimizer.layout.zeros("grad_buffer")
    else:
        buffers = ms.ParameterTuple(ms.Parameter(ms.Tensor(np.zeros(p.shape, np.float32)),
                                                 name=f"grad_buffer.{p.name}", requires_grad=False)
                                    for ps in params.values() for p in ps)
    return ApplyStep(buffers, optimizer, 1.0), buffers, [p for ps in params.values() for p in ps]


def run_apply_case(preset, latent, steps, ckpt):
    """The apply step alone, from random gradient buffers: the preset's real run (its LoRA, its
    optimizer groups), or `synthetic` (_synthetic_apply_step)."""
    import mindspore as ms
    import numpy as np
    from library import device
    device.configure()
    set_mindspore_threads()
    if preset == "synthetic":
        apply_step, buffers, trainable = _synthetic_apply_step()
        lrs = ms.Tensor(np.full(3, 1e-4, np.float32))
    else:
        with tempfile.TemporaryDirectory(prefix="train_bench_") as workdir:
            t = build_run(preset, latent, ckpt, workdir, steps)
            t.loader.close()
        apply_step, buffers = t.apply_step, t.grad_step.grad_buffers
        trainable, lrs = list(t.grad_step.trainable), ms.Tensor(t.schedule.lrs(0))
    rng = np.random.default_rng(1)
    for b in buffers:   # before the first compile, so the graph reads these values
        b.set_data(ms.Tensor(rng.standard_normal(b.shape).astype(np.float32) * 1e-3))
    accumulation = ms.Tensor(1.0, ms.float32)
    apply_step.optimizer.layout.compiled_writes = True     # as compile.step_graphs sets it
    run = ms.jit(apply_step.construct)

    def one():
        t0 = time.perf_counter()
        float(run(lrs, accumulation).asnumpy())
        return time.perf_counter() - t0

    first = one()
    timed = [one() for _ in range(steps)]
    try:
        from library.training.graph_stats import graph_op_counts
        kernels = sum(graph_op_counts(apply_step, lrs, accumulation).values())
    except ImportError:     # a tree from before the flat layout
        kernels = None
    print(json.dumps(dict(
        first=first, apply=statistics.median(timed), best=min(timed), steps=steps, kernels=kernels,
        lora_tensors=len(trainable), lora_values=int(sum(np.prod(p.shape) for p in trainable)),
        rss=_peak_rss_gib())), flush=True)


TORCH_CASE = r'''
import json, math, resource, statistics, sys, time
import torch
from torch import nn
from diffusers import UNet2DConditionModel

config, latent, steps, rank = json.load(open(sys.argv[1])), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
torch.set_num_threads(int(sys.argv[5]))
unet = UNet2DConditionModel.from_config(config)
unet.requires_grad_(False)
unet.train()


class LoRA(nn.Module):
    """kohya's LoRAModule: replaces org.forward; down kaiming-uniform(a=sqrt(5)), up zeros."""

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
opt = torch.optim.AdamW(params, lr=1e-4)
betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
alphas_cumprod = torch.cumprod(1 - betas, 0).float()
pooled_dim = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
latents = torch.randn(1, 4, latent, latent)
context = torch.randn(1, 77, config["cross_attention_dim"])
cond = {"text_embeds": torch.randn(1, pooled_dim),
        "time_ids": torch.tensor([[latent * 8, latent * 8, 0, 0, latent * 8, latent * 8]], dtype=torch.float32)}


def step():
    t0 = time.perf_counter()
    noise = torch.randn_like(latents)
    t = torch.randint(0, 1000, (1,))
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    pred = unet(noisy, t, context, added_cond_kwargs=cond).sample
    loss = nn.functional.mse_loss(pred.float(), noise, reduction="none").mean([1, 2, 3]).mean()
    loss.backward()
    t1 = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return t1 - t0, time.perf_counter() - t1


first = step()
timed = [step() for _ in range(steps)]
print(json.dumps(dict(
    first=sum(first), step=statistics.median(g + a for g, a in timed),
    best=min(g + a for g, a in timed),
    grad=statistics.median(g for g, _ in timed), apply=statistics.median(a for _, a in timed),
    steps=steps, rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
    lora_tensors=len(params), lora_values=sum(p.numel() for p in params),
    torch=torch.__version__, threads=torch.get_num_threads())))
'''


LIBRARY = ROOT    # the tree whose library the cases measure (--library)


THREADS = (1, 0)      # (--torch-threads, --ms-threads) of every case


def _child(args, env=None):
    proc = subprocess.run(args, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=LIBRARY, BENCH_LIBRARY=LIBRARY,
                                   **thread_env(*THREADS), **(env or {})))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        return {"error": tail[:200]}
    return json.loads(lines[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=5, help="timed steps (graph mode, PyTorch)")
    p.add_argument("--pynative-steps", type=int, default=2, help="timed steps in PyNative")
    p.add_argument("--tiny-latent", type=int, default=64)
    p.add_argument("--medium-latent", type=int, default=32)
    p.add_argument("--presets", default="tiny,medium")
    p.add_argument("--modes", default="graph,pynative")
    p.add_argument("--torch-python", default=None)
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--no-synthetic", action="store_true",
                   help="skip the apply step on a full-size SDXL LoRA's 2,104 tensors")
    p.add_argument("--apply-only", action="store_true",
                   help="only the apply-step table (no grad step, PyNative or PyTorch rows)")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="PyTorch's threads (default 1; see bench/_bench_venv.py)")
    p.add_argument("--ms-threads", type=int, default=0,
                   help="MindSpore's CPU kernel threads (default 0: MindSpore's default)")
    p.add_argument("--library", default=ROOT,
                   help="the source tree to measure (e.g. a checkout of an older commit)")
    p.add_argument("--case", nargs=5, help=argparse.SUPPRESS)  # internal: preset mode latent steps ckpt
    p.add_argument("--apply-case", nargs=4, help=argparse.SUPPRESS)  # internal: preset latent steps ckpt
    args = p.parse_args()
    if args.apply_case:
        preset, latent, steps, ckpt = args.apply_case
        return run_apply_case(preset, int(latent), int(steps), ckpt)
    if args.case:
        preset, mode, latent, steps, ckpt = args.case
        return run_case(preset, mode, int(latent), int(steps), ckpt)

    tmp = tempfile.mkdtemp(prefix="train_bench_")
    try:
        _measure(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _measure(args, tmp):
    global LIBRARY, THREADS
    LIBRARY = os.path.abspath(args.library)
    THREADS = (args.torch_threads, args.ms_threads)
    ckpt = os.path.join(tmp, "tiny.safetensors")
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_tiny_sdxl.py"), "--out", ckpt,
                    "--seed", "0"], check=True, capture_output=True)
    python = None if args.no_torch else (args.torch_python or bench_python())
    latents = {"tiny": args.tiny_latent, "medium": args.medium_latent}
    rows, load_before = [], os.getloadavg()[0]
    if args.apply_only:
        return _apply_table(args, latents, ckpt, load_before)
    for preset in args.presets.split(","):
        latent = latents[preset]
        ms_rows = {}
        for mode in args.modes.split(","):
            steps = args.steps if mode == "graph" else args.pynative_steps
            r = _child([sys.executable, os.path.abspath(__file__), "--case", preset, mode,
                        str(latent), str(steps), ckpt])
            ms_rows[mode] = r
            rows.append((preset, latent, f"MindSpore {mode}", r))
            print(preset, mode, r, file=sys.stderr, flush=True)
        if python:
            from library.models.config import get_preset
            from library.models.diffusers_config import _unet
            config = os.path.join(tmp, f"{preset}_unet.json")
            with open(config, "w") as f:
                json.dump(_unet(get_preset(preset)), f)
            script = os.path.join(tmp, "torch_case.py")
            with open(script, "w") as f:
                f.write(TORCH_CASE)
            r = _child([python, script, config, str(latent), str(args.steps), str(RANK),
                        str(args.torch_threads)])
            rows.append((preset, latent, f"PyTorch {r.get('torch', '')} eager", r))
            print(preset, "torch", r, file=sys.stderr, flush=True)
            graph = ms_rows.get("graph", {})
            if "best" in r and "best" in graph:
                r["ratio"] = r["best"] / graph["best"]

    print(f"\nSDXL LoRA train step (UNet LoRA rank {RANK}, cached latents and text, AdamW, "
          f"max_grad_norm 1, float32, batch 1), CPU ({os.cpu_count()} cores); s/step: median and "
          f"fastest of {args.steps} steps ({args.pynative_steps} in PyNative) after one warm-up "
          f"step; compile: warm-up step minus the median step; PyTorch/graph: ratio of the "
          f"fastest steps; PyTorch {args.torch_threads} thread(s), MindSpore "
          f"{args.ms_threads or 'default'} kernel threads. Load average (1 min) "
          f"{load_before:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end\n")
    print("| preset | latent | backend | compile (s) | s/step median (fastest) | grad / apply (s) "
          "| peak RSS (GiB) | LoRA tensors | PyTorch / graph |")
    print("|---|---|---|---|---|---|---|---|---|")
    for preset, latent, backend, r in rows:
        size = f"{latent}×{latent}"
        if "error" in r:
            print(f"| {preset} | {size} | {backend} | – | failed: {r['error']} | – | – | – | – |")
            continue
        compile_s = f"{r['first'] - r['step']:.1f}" if backend == "MindSpore graph" else "–"
        ratio = f"{r['ratio']:.2f}×" if "ratio" in r else "–"
        print(f"| {preset} | {size} | {backend} | {compile_s} | {r['step']:.2f} ({r['best']:.2f}) | "
              f"{r['grad']:.2f} / {r['apply']:.2f} | {r['rss']:.2f} | {r['lora_tensors']} | {ratio} |")

    _apply_table(args, latents, ckpt, load_before)


def _apply_table(args, latents, ckpt, load_before):
    cases = [(preset, latents[preset], f"{preset} {latents[preset]}×{latents[preset]}")
             for preset in args.presets.split(",")]
    if not args.no_synthetic:
        cases.append(("synthetic", 0, "synthetic: full-size SDXL LoRA (TE1+TE2+UNet, conv_dim)"))
    rows = []
    for preset, latent, name in cases:
        r = _child([sys.executable, os.path.abspath(__file__), "--apply-case", preset,
                    str(latent), str(args.steps), ckpt])
        print("apply", preset, r, file=sys.stderr, flush=True)
        rows.append((name, r))
    print(f"\nApply step alone (AdamW, max_grad_norm 1, float32, random gradient buffers), "
          f"MindSpore graph mode, {LIBRARY}: compile = first call minus the median; median and "
          f"fastest of {args.steps} calls after it; operators: nodes of its compiled graph "
          f"(library.training.graph_stats). Load average (1 min) {load_before:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end\n")
    print("| run | LoRA tensors | LoRA values | compile (s) | apply (s) median (fastest) | operators |")
    print("|---|---|---|---|---|---|")
    for name, r in rows:
        if "error" in r:
            print(f"| {name} | – | – | – | failed: {r['error']} | – |")
            continue
        print(f"| {name} | {r['lora_tensors']} | {r['lora_values']:,} | {r['first'] - r['apply']:.1f} "
              f"| {r['apply']:.3f} ({r['best']:.3f}) | {r['kernels'] if r['kernels'] else '–'} |")


if __name__ == "__main__":
    main()
